"""Evaluation on the tiny Llama: assistant-only loss per byte (and per token), choice scoring, generation, size.

Decode speed: tests/learners/test_speed.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from selftune.learners import evaluate
from selftune.learners.chat import IGNORE_INDEX, encode_chat
from selftune.learners.evaluate import (
    BYTE_LEVEL_CHARS,
    choice_accuracy,
    complete_answers,
    generate_answers,
    held_out_loss,
    load_model,
    parameter_count,
    score_choices,
    target_bytes,
    target_counts,
)
from selftune.policies.gates import LOSS_UNIT

PAIRS = [
    ("What is a list in Python?", "A mutable sequence of items."),
    ("What does len() return?", "The number of items in a container, such as a list or a string."),
    ("Define a tuple.", "An immutable sequence."),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    torch.manual_seed(0)
    return load_model(tiny_model_dir)


def test_held_out_loss_is_per_byte_of_the_answers_and_matches_transformers(tiny) -> None:
    model, tokenizer = tiny
    result = held_out_loss(model, tokenizer, PAIRS, batch_size=2, autocast=False)
    # The summed NLL of each row's own (transformers-computed) mean loss, over the tokens and over the bytes.
    total, tokens = 0.0, 0
    for pair in PAIRS:
        ids, labels = encode_chat(tokenizer, pair)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        n = sum(1 for lab in labels[1:] if lab != -100)
        total += out.loss.item() * n
        tokens += n
    answer_bytes = sum(len(answer.encode("utf-8")) for _, answer in PAIRS)  # the end of turn adds no byte
    assert result.tokens == tokens and result.rows == 3 and result.bytes == answer_bytes
    assert result.nll == pytest.approx(total, rel=1e-5)
    assert result.loss == pytest.approx(total / answer_bytes, rel=1e-5) == result.nll / result.bytes
    assert result.bits_per_byte == pytest.approx(result.loss / math.log(2))
    assert result.loss_per_token == pytest.approx(total / tokens, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss_per_token))
    assert result.to_dict()["unit"] == LOSS_UNIT == "nats/byte"
    assert target_counts(tokenizer, PAIRS) == (result.tokens, result.bytes)
    # Padding does not change the answer, and bf16 autocast stays close to float32.
    assert held_out_loss(model, tokenizer, PAIRS, batch_size=1, autocast=False).loss == pytest.approx(result.loss, rel=1e-5)
    assert held_out_loss(model, tokenizer, PAIRS, batch_size=3).loss == pytest.approx(result.loss, rel=2e-2)


def test_target_bytes_are_the_answer_text_in_utf8_and_special_tokens_count_none(tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # multi-byte characters that byte-level BPE splits across tokens count their own share in each
    for answer in ["A mutable sequence of items.", "naïve café – 東京 🚀 ok", "x", "tab\tand\nnewline."]:
        ids, labels = encode_chat(tokenizer, ("Say it.", answer))
        assert ids[-1] == labels[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # a target, of 0 bytes
        assert target_bytes(tokenizer, ids, labels) == len(answer.encode("utf-8")), answer
    # a multi-turn row counts every answer; a cut row only what is left of its answers
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
             {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Über."}]
    ids, labels = encode_chat(tokenizer, turns)
    assert target_bytes(tokenizer, ids, labels) == len("Hello there.Über.".encode("utf-8"))
    first = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
    assert target_bytes(tokenizer, ids[: first + 1], labels[: first + 1]) == len("Hello".encode("utf-8"))
    assert target_bytes(tokenizer, ids, [IGNORE_INDEX] * len(ids)) == 0


def test_two_tokenizations_of_the_same_text_have_the_same_bytes(tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    answer = "Fewer, longer tokens — or one per byte: the text is the same (ü)."
    ids, labels = encode_chat(tokenizer, ("Say it.", answer))
    start = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
    # the same answer spelt one byte-level token per byte, then the same end of turn
    table = evaluate._bytes_to_unicode()  # byte -> its character in the byte-level alphabet
    assert set(table.values()) == BYTE_LEVEL_CHARS and len(BYTE_LEVEL_CHARS) == 256
    per_byte = tokenizer.convert_tokens_to_ids([table[b] for b in answer.encode("utf-8")])
    spelt = [*ids[:start], *per_byte, ids[-1]]
    assert len(spelt) > len(ids) + 10 and tokenizer.decode(spelt[start:-1]) == answer
    assert target_bytes(tokenizer, spelt, [IGNORE_INDEX] * start + spelt[start:]) == len(answer.encode("utf-8"))
    assert target_bytes(tokenizer, ids, labels) == len(answer.encode("utf-8"))


def test_target_bytes_of_a_tokenizer_that_is_not_byte_level_decode_the_target_runs(
        tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    monkeypatch.setattr(evaluate, "_is_byte_level", lambda tok: False)
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "naïve café – 東京 🚀"},
             {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Über."}]
    ids, labels = encode_chat(tokenizer, turns)
    assert target_bytes(tokenizer, ids, labels) == len("naïve café – 東京 🚀Über.".encode("utf-8"))


def test_a_tokenizer_with_fewer_merges_scores_the_same_bytes_in_more_tokens(tiny, tokenizer_dir: Path,
                                                                          tmp_path: Path) -> None:
    model, tokenizer = tiny
    # The same vocabulary without its merges: every word spelt byte by byte (ids unchanged, so the model runs)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    spec["model"]["merges"] = []
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    bytewise = AutoTokenizer.from_pretrained(tmp_path)
    coarse = held_out_loss(model, tokenizer, PAIRS, autocast=False)
    fine = held_out_loss(model, bytewise, PAIRS, autocast=False)
    assert fine.tokens > 2 * coarse.tokens
    assert fine.bytes == coarse.bytes == sum(len(answer.encode("utf-8")) for _, answer in PAIRS)
    assert fine.loss == pytest.approx(fine.nll / fine.bytes) and fine.loss_per_token == pytest.approx(fine.nll / fine.tokens)


def test_a_row_set_with_no_text_to_measure_is_an_error_naming_it(tiny) -> None:
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="all special tokens"):
        held_out_loss(model, tokenizer, [("Say nothing.", "")], autocast=False)


def test_choice_scoring_prefers_what_the_model_was_taught(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(tiny_model_dir)
    prompt, right, wrong = "Capital of France?", "Paris is the capital.", "Bananas are yellow."
    before = score_choices(model, tokenizer, prompt, [right, wrong])
    # Teach the tiny model the right answer; its score must rise and win.
    ids, labels = encode_chat(tokenizer, (prompt, right))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(15):
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after = score_choices(model, tokenizer, prompt, [right, wrong], autocast=False)
    assert after[0] > before[0] and after[0] > after[1]
    result = choice_accuracy(model, tokenizer, [(prompt, [wrong, right], 1), (prompt, [right, wrong], 1)])
    assert (result.passed, result.total, result.best) == (1, 2, (1, 0))
    assert result.accuracy == 0.5


def test_generation_is_greedy_and_batching_does_not_change_answers(tiny) -> None:
    model, tokenizer = tiny
    prompts = ["Hello", "Tell me something longer about the weather today, please."]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    single = [generate_answers(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(a, str) for a in batched)


def test_complete_answers_leave_out_turns_the_model_did_not_end(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(tiny_model_dir)
    prompt = "Hello"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    width = ids["input_ids"].shape[1]
    new = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, width:].tolist()
    never = next(t for t in range(len(tokenizer)) if t not in new)
    model.generation_config.eos_token_id = tokenizer.eos_token_id = never  # the answer runs to the budget
    assert complete_answers(model, tokenizer, [prompt], max_new_tokens=12) == [None]  # cut off: left out
    model.generation_config.eos_token_id = tokenizer.eos_token_id = new[0]  # the model ends its turn at once
    assert complete_answers(model, tokenizer, [prompt], max_new_tokens=12) == [""]


def test_parameter_count(tiny) -> None:
    model, _ = tiny
    config = model.config
    per_layer = (
        2 * config.hidden_size * config.hidden_size  # q, o
        + 2 * config.hidden_size * config.num_key_value_heads * config.head_dim  # k, v
        + 3 * config.hidden_size * config.intermediate_size  # gate, up, down
        + 2 * config.hidden_size  # norms
    )
    expected = config.vocab_size * config.hidden_size + config.num_hidden_layers * per_layer + config.hidden_size
    assert parameter_count(model) == expected  # tied embeddings counted once


def test_tied_embeddings_count_once(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    untied = sum(p.numel() for name, p in model.named_parameters(remove_duplicate=False))
    assert parameter_count(model) == untied - model.lm_head.weight.numel()


@pytest.fixture
def varied_model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The tiny Llama with untied embeddings: a tied random model just repeats its last token ("\\n")."""
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "varied")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "varied")
    return tmp_path / "varied"


def test_generate_answers_is_greedy_over_the_chat_template(varied_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(varied_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(varied_model_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name a colour."}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    prompt_length = ids.shape[1]
    with torch.no_grad():
        for _ in range(6):  # argmax decoding by hand, the reference
            next_token = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_token.view(1, 1)], dim=1)
            if next_token.item() == tokenizer.eos_token_id:
                break
    expected = tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True).strip()

    assert len(set(ids[0, prompt_length:].tolist())) > 1, "the reference must be more than one repeated token"
    assert expected
    assert generate_answers(*load_model(varied_model_dir), ["Name a colour."], max_new_tokens=6) == [expected]


def test_row_losses_are_each_rows_held_out_loss(tiny) -> None:
    model, tokenizer = tiny
    rows = [[{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A mutable sequence."}],
            [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hello, wörld! 👋"}],
            [{"role": "user", "content": "Nothing?"}, {"role": "assistant", "content": ""}]]
    losses = evaluate.row_losses(model, tokenizer, rows)
    for row, loss in zip(rows[:2], losses):
        assert loss == pytest.approx(evaluate.held_out_loss(model, tokenizer, [row], autocast=False).loss, rel=2e-2)
    assert losses[2] is None  # no answer text: nothing to score per byte
