"""Vocabulary trimming decisions: the merge closure, the kept merges in order, the reasons, the config."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selftune.policies.vocab import (
    REASONS,
    SECTION,
    VocabTrimConfig,
    merge_closure,
    most_frequent,
    plan_vocabulary,
    tokens_to_keep,
    trimmed_merges,
)

ON = VocabTrimConfig(enabled=True, general_tokens=0)

# A toy BPE: four base letters, merges in rank order, each building a new token.
BASE = ["a", "b", "c", "d"]
MERGES = [("a", "b"), ("c", "d"), ("ab", "c"), ("b", "c"), ("abc", "d"), ("ab", "ab"), ("cd", "cd")]
VOCAB = {t: i for i, t in enumerate(BASE + [a + b for a, b in MERGES])}


def ids(*tokens: str) -> set[int]:
    return {VOCAB[t] for t in tokens}


def plan(traffic: set[int] = frozenset(), general: dict[int, int] | None = None, config: VocabTrimConfig = ON,
         special: set[int] = frozenset(), template: set[int] = frozenset()):
    return plan_vocabulary(VOCAB, MERGES, special_ids=special, byte_alphabet_ids=ids(*BASE),
                           traffic_counts={i: 1 for i in traffic}, general_counts=general or {}, config=config,
                           template_ids=template)


def test_a_kept_token_keeps_its_merge_and_parts_recursively() -> None:
    result = plan(traffic=ids("abcd"))
    kept = {t for t, i in VOCAB.items() if i in result.kept_ids}
    # abcd <- abc + d <- (ab + c) <- (a + b): every step on the way, nothing else built
    assert kept == set(BASE) | {"ab", "abc", "abcd"}
    assert result.merges == (("a", "b"), ("ab", "c"), ("abc", "d"))
    assert result.kept_by_reason["traffic"] == 1 and result.kept_by_reason["closure"] == 2
    assert merge_closure({"abab"}, MERGES) == {"abab", "ab", "a", "b"}


def test_every_merge_that_builds_a_kept_token_is_kept_with_its_parts() -> None:
    merges = [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]  # two ways to build "abc"
    assert merge_closure({"abc"}, merges) == {"abc", "ab", "bc", "a", "b", "c"}


def test_kept_merges_keep_their_original_order() -> None:
    result = plan(traffic=ids("cdcd", "abab", "bc"))
    ranks = [MERGES.index(m) for m in result.merges]
    assert ranks == sorted(ranks)
    assert result.merges == (("a", "b"), ("c", "d"), ("b", "c"), ("ab", "ab"), ("cd", "cd"))
    assert result.id_map == {old: new for new, old in enumerate(sorted(result.kept_ids))}


def test_trimmed_merges_refuses_a_set_that_is_not_closed() -> None:
    with pytest.raises(ValueError, match="'ab' \\+ 'c' is kept but its part 'ab' is not"):
        trimmed_merges(MERGES, {"a", "b", "c", "abc"})


def test_reasons_count_each_token_once_in_priority_order() -> None:
    result = plan(traffic=ids("a", "ab"), special=ids("a"), template=ids("ab", "cd"),
                  general={VOCAB["cd"]: 3, VOCAB["bc"]: 5},
                  config=VocabTrimConfig(enabled=True, general_tokens=1, fill_general_by_merge_rank=False))
    assert set(result.kept_by_reason) == set(REASONS)
    assert sum(result.kept_by_reason.values()) == result.vocab_size_after
    # "a" is special before byte; "ab", "cd" template before traffic; "bc" the one most frequent general token
    assert result.kept_by_reason == {"special": 1, "byte_alphabet": 3, "template": 2, "traffic": 0, "general": 1,
                                     "closure": 0}


def test_general_tokens_are_the_most_frequent_then_filled_by_merge_rank() -> None:
    assert most_frequent({5: 2, 3: 2, 9: 7, 4: 0}, 3) == [9, 3, 5]
    filled = plan(general={VOCAB["cdcd"]: 4}, config=VocabTrimConfig(enabled=True, general_tokens=3))
    kept = {t for t, i in VOCAB.items() if i in filled.kept_ids}
    assert {"cdcd", "ab", "cd"} <= kept and "abc" not in kept  # cdcd by count, then the two lowest merge ranks
    unfilled = plan(general={VOCAB["cdcd"]: 4},
                    config=VocabTrimConfig(enabled=True, general_tokens=3, fill_general_by_merge_rank=False))
    assert {t for t, i in VOCAB.items() if i in unfilled.kept_ids} == set(BASE) | {"cd", "cdcd"}


def test_disabled_keeps_everything() -> None:
    result = plan(config=VocabTrimConfig(enabled=False))
    assert result.kept_ids == tuple(range(len(VOCAB))) and result.merges == tuple(MERGES)
    assert tokens_to_keep(VOCAB, MERGES, special_ids=(), byte_alphabet_ids=(), traffic_counts={},
                          general_counts={}, config=VocabTrimConfig()) == frozenset(range(len(VOCAB)))


def test_unknown_ids_and_broken_merges_are_refused() -> None:
    with pytest.raises(ValueError, match=r"traffic token ids \[99\] are not in the vocabulary"):
        plan(traffic={99})
    with pytest.raises(ValueError, match="merge 0 \\('a' \\+ 'x'\\) uses 'x'"):
        plan_vocabulary(VOCAB, [("a", "x")], special_ids=(), byte_alphabet_ids=(), traffic_counts={},
                        general_counts={}, config=ON)


def test_config_problems_name_the_key_the_value_and_the_fix() -> None:
    assert VocabTrimConfig().problems() == []
    problems = VocabTrimConfig(general_tokens=-1, enabled="yes").problems()  # type: ignore[arg-type]
    assert problems == [f"{SECTION}.general_tokens = -1: use 0 (none) or a positive count, e.g. 8000",
                        f"{SECTION}.enabled = 'yes': use true or false"]
    fractional = VocabTrimConfig(general_tokens=2.5)  # type: ignore[arg-type]
    assert fractional.problems()[0].startswith(f"{SECTION}.general_tokens = 2.5")


# ---- the claim of trimmed_merges, on random BPE models with a reference encoder ----------------------


def bpe_encode(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """Reference BPE: apply the lowest-ranked applicable merge (leftmost first) until none applies."""
    rank = {m: r for r, m in enumerate(merges)}
    pieces = list(word)
    while True:
        pairs = [(rank[p], i) for i, p in enumerate(zip(pieces, pieces[1:])) if p in rank]
        if not pairs:
            return pieces
        _, i = min(pairs)
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]


def random_bpe(rng: random.Random, size: int) -> list[tuple[str, str]]:
    tokens, merges = list("abc"), []
    while len(merges) < size:
        left, right = rng.choice(tokens), rng.choice(tokens)
        if left + right not in tokens and len(left + right) <= 6:
            tokens.append(left + right)
            merges.append((left, right))
    return merges


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_in_scope_words_encode_identically_and_no_dropped_token_appears(seed: int) -> None:
    rng = random.Random(seed)
    merges = random_bpe(rng, 25)
    words = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 10))) for _ in range(30)]
    in_scope = words[:10]
    kept = merge_closure({t for w in in_scope for t in bpe_encode(w, merges)} | set("abc"), merges)
    kept_merges = list(trimmed_merges(merges, kept))
    for word in in_scope:
        assert bpe_encode(word, kept_merges) == bpe_encode(word, merges)
    for word in words:
        pieces = bpe_encode(word, kept_merges)
        assert set(pieces) <= kept and "".join(pieces) == word


def test_a_trim_within_a_budget_tries_the_general_token_counts_smallest_vocabulary_first() -> None:
    from selftune.policies.vocab import VocabTrimConfig, general_token_steps

    assert general_token_steps(VocabTrimConfig(general_tokens=8000), 49152) == [8000, 16000, 32000]
    assert general_token_steps(VocabTrimConfig(general_tokens=0), 5) == [1, 2, 4]
    assert general_token_steps(VocabTrimConfig(general_tokens=64000), 49152) == []  # keeps every token: no trim
