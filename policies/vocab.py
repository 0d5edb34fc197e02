"""Vocabulary trimming decisions: which tokens of a byte-level BPE vocabulary a specialist keeps.

The learners count tokens (on the branch's traffic and on general text) and rewrite the tokenizer and
the embedding; these functions decide over plain data: the vocabulary (token -> id), the merges in rank
order, and token counts. Stdlib only, no I/O.

What is kept (``plan_vocabulary``), each token under the first reason that applies:
- ``special``: added and special tokens (the chat template's markers, end of sequence, padding);
- ``byte_alphabet``: the 256 byte tokens of a ByteLevel BPE (those the vocabulary has), so that any text
  still encodes, one byte at a time where nothing larger is kept;
- ``template``: the tokens of the chat template's own text (its default system prompt, role names);
- ``traffic``: every token of the branch's training, replay and rehearsal rows;
- ``general``: the ``general_tokens`` most frequent tokens of general text (filled up by merge rank);
- ``closure``: the parts of every kept token, recursively, through the merges that build them.

Why the closure makes the trimmed tokenizer consistent (see ``trimmed_merges``): the encoder can never
produce a dropped token, and a word whose original encoding used only kept tokens encodes identically.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SECTION = "trim_vocab"
"""Prefix of the configuration messages (the TOML section that holds ``VocabTrimConfig``)."""

REASONS = ("special", "byte_alphabet", "template", "traffic", "general", "closure")
"""Why a token is kept, in priority order: a token is counted under the first reason that applies."""

Merge = tuple[str, str]


@dataclass(frozen=True)
class VocabTrimConfig:
    enabled: bool = False
    """Trim the vocabulary of a pruned generation to what its specialty uses. Off keeps the parent's vocabulary."""
    general_tokens: int = 8000
    """The most frequent tokens of general text kept beside the specialty's own, so that the specialist still
    reads ordinary prose in whole words; 0 keeps none (text outside the specialty then falls back to shorter
    pieces, down to single bytes, and costs more tokens)."""
    fill_general_by_merge_rank: bool = True
    """When the general text holds fewer distinct tokens than ``general_tokens``, fill up with the earliest
    merges of the vocabulary: a BPE trainer learns its merges in order of frequency on its own (general)
    corpus, so the lowest ranks are the next most frequent general tokens."""

    def problems(self) -> list[str]:
        out = []
        if isinstance(self.general_tokens, bool) or not isinstance(self.general_tokens, int):
            out.append(f"{SECTION}.general_tokens = {self.general_tokens!r}: use a whole count, e.g. 8000")
        elif self.general_tokens < 0:
            out.append(f"{SECTION}.general_tokens = {self.general_tokens}: use 0 (none) or a positive count, "
                       "e.g. 8000")
        for name in ("enabled", "fill_general_by_merge_rank"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{SECTION}.{name} = {getattr(self, name)!r}: use true or false")
        return out


@dataclass(frozen=True)
class VocabPlan:
    """What to keep. Ids are the parent's; ``id_map`` gives each kept id its new, dense id (same order)."""

    vocab_size_before: int
    kept_ids: tuple[int, ...]
    """Kept ids of the parent, ascending; the new id of ``kept_ids[i]`` is ``i``."""
    kept_by_reason: dict[str, int]
    """How many kept tokens each reason of ``REASONS`` accounts for (first reason that applies)."""
    merges: tuple[Merge, ...]
    """The merges kept, in their original rank order (see ``trimmed_merges``)."""
    merges_before: int

    @property
    def vocab_size_after(self) -> int:
        return len(self.kept_ids)

    @property
    def id_map(self) -> dict[int, int]:
        return {old: new for new, old in enumerate(self.kept_ids)}


def merge_closure(keep: Collection[str], merges: Sequence[Merge]) -> frozenset[str]:
    """``keep`` plus the parts of every merge that builds a kept token, recursively.

    Every token of the result is then either a base token (no merge builds it) or built by a merge whose
    two parts are in the result too: the BPE encoder can reach each of them from single bytes.
    """
    builders: dict[str, list[Merge]] = {}
    for left, right in merges:
        builders.setdefault(left + right, []).append((left, right))
    closed = set(keep)
    todo = list(closed)
    while todo:
        for merge in builders.get(todo.pop(), ()):
            for part in merge:
                if part not in closed:
                    closed.add(part)
                    todo.append(part)
    return frozenset(closed)


def trimmed_merges(merges: Sequence[Merge], kept: Collection[str]) -> tuple[Merge, ...]:
    """The merges whose result is kept, in their original order; ``kept`` must be closed (``merge_closure``).

    Why this keeps encoding consistent. BPE encodes a word (a piece of the pre-tokenizer) from its single
    byte tokens by applying, again and again, the lowest-ranked merge that applies anywhere in it (leftmost
    first), until none applies. Trimmed, the same algorithm runs over the kept merges in the same order:
    - No dropped token is ever produced: the byte tokens are all kept, and every merge left produces a
      kept token (a merge that produces a dropped token is gone).
    - A word whose original encoding contains only kept tokens encodes identically. Every token that the
      original run produced on the way is a part, at some depth, of a final token, so the closure kept it
      and the merge that built it. At each step the original run applied the lowest-ranked applicable merge
      of the full list; that merge is still in the trimmed list, and every merge of the trimmed list is one
      of the full list with its relative order unchanged, so it is also the lowest-ranked applicable merge
      of the trimmed list: both runs take the same step from the same state, and both stop together (no
      merge applies in the full list, so none in its sub-list).
    - A word whose original encoding used a dropped token stops at that token's parts (or their parts), as
      the merges after it that needed it are unreachable: the text still encodes, in more tokens.
    The pre-tokenizer, the normaliser and the added-token matching are unchanged, and every added token
    is kept, so the split into words is the same before and after.
    """
    kept_set = set(kept)
    out = []
    for left, right in merges:
        if left + right in kept_set:
            if left not in kept_set or right not in kept_set:
                missing = left if left not in kept_set else right
                raise ValueError(f"merge {left!r} + {right!r} is kept but its part {missing!r} is not: close the "
                                 "kept tokens with merge_closure first")
            out.append((left, right))
    return tuple(out)


def most_frequent(counts: Mapping[int, int], n: int) -> list[int]:
    """The ``n`` ids with the highest counts (ties go to the lower id); ids with a count of 0 never."""
    return heapq.nsmallest(n, (i for i, c in counts.items() if c > 0), key=lambda i: (-counts[i], i))


def plan_vocabulary(
    vocab: Mapping[str, int],
    merges: Sequence[Merge],
    *,
    special_ids: Collection[int],
    byte_alphabet_ids: Collection[int],
    traffic_counts: Mapping[int, int],
    general_counts: Mapping[int, int],
    config: VocabTrimConfig,
    template_ids: Collection[int] = (),
) -> VocabPlan:
    """Decide the kept tokens (see the module's docstring for the reasons) and the kept merges.

    ``vocab``: token string -> id of the parent's BPE model; ``merges``: its merges in rank order;
    ``*_counts``: id -> occurrences of that token when the texts are encoded with the parent's tokenizer.
    A disabled config keeps every token and merge.
    """
    by_id = {i: token for token, i in vocab.items()}
    if len(by_id) != len(vocab):
        raise ValueError(f"the vocabulary maps {len(vocab)} tokens to {len(by_id)} ids: every token needs its own id")
    if not config.enabled:
        return VocabPlan(len(vocab), tuple(sorted(by_id)), {"all": len(vocab)}, tuple(merges), len(merges))
    for what, ids in (("special", special_ids), ("byte alphabet", byte_alphabet_ids), ("template", template_ids),
                      ("traffic", traffic_counts), ("general", general_counts)):
        unknown = sorted(i for i in ids if i not in by_id)
        if unknown:
            raise ValueError(f"{what} token ids {unknown[:5]} are not in the vocabulary of {len(vocab)} tokens: "
                             "count them with the parent's own tokenizer")

    for rank, (left, right) in enumerate(merges):
        missing = next((t for t in (left, right, left + right) if t not in vocab), None)
        if missing is not None:
            raise ValueError(f"merge {rank} ({left!r} + {right!r}) uses {missing!r}, which is not in the vocabulary: "
                             "the tokenizer is inconsistent; re-save it with the tokenizers library")
    general = most_frequent(general_counts, config.general_tokens)
    if config.fill_general_by_merge_rank and len(general) < config.general_tokens:
        chosen = set(general)
        for left, right in merges:  # rank order: the trainer's own frequency order
            if len(general) >= config.general_tokens:
                break
            token_id = vocab[left + right]
            if token_id not in chosen:
                chosen.add(token_id)
                general.append(token_id)

    reason_of: dict[int, str] = {}
    seeds = (("special", special_ids), ("byte_alphabet", byte_alphabet_ids), ("template", template_ids),
             ("traffic", [i for i, c in traffic_counts.items() if c > 0]), ("general", general))
    for reason, ids in seeds:
        for i in ids:
            reason_of.setdefault(i, reason)
    closed = merge_closure([by_id[i] for i in reason_of], merges)
    for token in closed:
        reason_of.setdefault(vocab[token], "closure")
    kept_merges = trimmed_merges(merges, closed)
    counts = {reason: 0 for reason in REASONS}
    for reason in reason_of.values():
        counts[reason] += 1
    return VocabPlan(len(vocab), tuple(sorted(reason_of)), counts, kept_merges, len(merges))


def tokens_to_keep(vocab: Mapping[str, int], merges: Sequence[Merge], **inputs: Any) -> frozenset[int]:
    """The kept ids of ``plan_vocabulary(vocab, merges, **inputs)`` (the parent's ids), closed under the merges;
    ``inputs`` are its keyword arguments (``special_ids``, ``byte_alphabet_ids``, ..., ``config``)."""
    return frozenset(plan_vocabulary(vocab, merges, **inputs).kept_ids)


def general_token_steps(config: VocabTrimConfig, vocab_size: int) -> list[int]:
    """The general-token counts a trim within a loss budget tries, smallest vocabulary first: ``general_tokens``,
    doubled while it stays below the vocabulary (a trim that keeps every token is no trim)."""
    steps, count = [], max(config.general_tokens, 1)
    while count < vocab_size:
        steps.append(count)
        count *= 2
    return steps
