"""The one chat encoder (every assistant turn a target, for training and evaluation alike) and the shared ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from selftune.learners import data, evaluate
from selftune.learners.chat import IGNORE_INDEX, encode_chat, end_token_ids, pad_id
from selftune.learners.data import encode_rows
from selftune.learners.evaluate import held_out_loss, load_model
from selftune.learners.lm import load_tokenizer, mean_token_nll
from selftune.policies.ingest import parse_row
from selftune.policies.records import Message

PAIR = ("What is a list in Python?", "A mutable sequence of items.")
MULTI_TURN = [
    {"role": "user", "content": "Symbol of gold?"},
    {"role": "assistant", "content": "Au"},
    {"role": "user", "content": "And silver?"},
    {"role": "assistant", "content": "Ag"},
]


def test_labels_cover_the_assistant_turns_only(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Symbol of gold?"},
        {"role": "assistant", "content": "Au"},
        {"role": "user", "content": "And silver?"},
        {"role": "assistant", "content": "Ag"},
    ]
    ids, labels = encode_chat(tok, messages, max_length=512)
    assert len(ids) == len(labels)
    targets = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert tok.decode(targets) == f"Au{tok.eos_token}Ag{tok.eos_token}"
    # every prompt, system and template token carries no loss
    prompt_text = tok.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert "Symbol of gold?" in prompt_text and "And silver?" in prompt_text and "Be brief." in prompt_text
    assert "Au" not in prompt_text.replace("assistant", "")


def test_encode_chat_labels_only_the_answer_and_its_end_of_turn(tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_dir)
    ids, labels = encode_chat(tokenizer, PAIR)
    target = [t for t, lab in zip(ids, labels) if lab != -100]
    assert tokenizer.decode(target) == "A mutable sequence of items.<|im_end|>"
    assert ids[: len(ids) - len(target)] == tokenizer(
        tokenizer.apply_chat_template([{"role": "user", "content": PAIR[0]}], add_generation_prompt=True,
                                      tokenize=False), add_special_tokens=False)["input_ids"]
    # Messages work the same as a pair, and so does a learner row.
    as_messages = (Message("user", PAIR[0]), Message("assistant", PAIR[1]))
    assert encode_chat(tokenizer, as_messages) == (ids, labels)
    assert encode_chat(tokenizer, {"id": 1, "prompt": PAIR[0], "response": PAIR[1]}) == (ids, labels)
    with pytest.raises(ValueError, match="must end with the assistant"):
        encode_chat(tokenizer, [{"role": "user", "content": "hi"}])


def test_a_multi_turn_row_labels_both_answers_and_nothing_else(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    ids, labels = encode_chat(tok, MULTI_TURN)
    labelled = [k for k, label in enumerate(labels) if label != IGNORE_INDEX]
    assert [labels[k] for k in labelled] == [ids[k] for k in labelled]  # a label is the token itself
    first, second = _runs(labelled)  # two answers, each one unbroken run of labels
    assert tok.decode(ids[first[0] : first[-1] + 1]) == f"Au{tok.eos_token}"
    assert tok.decode(ids[second[0] : second[-1] + 1]) == f"Ag{tok.eos_token}"
    assert labelled[-1] == len(ids) - 1  # the sequence ends with the last answer's end of turn


def _runs(positions: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for k in positions:
        if runs and runs[-1][-1] == k - 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    return runs


def test_training_and_evaluation_measure_the_same_tokens_of_a_multi_turn_row(tiny_model_dir: Path) -> None:
    # one encoder serves both (the Fisher estimate reads encode_rows' items too)
    assert data.encode_chat is evaluate.encode_chat is encode_chat
    model, tokenizer = load_model(tiny_model_dir)
    row = {"id": 7, "messages": MULTI_TURN}
    items, dropped = encode_rows(tokenizer, [row], max_length=256)
    assert dropped == 0 and (items[0].input_ids, items[0].labels) == encode_chat(tokenizer, row, 256)
    held_out = held_out_loss(model, tokenizer, [MULTI_TURN], max_length=256, autocast=False)
    assert held_out.tokens == items[0].target_tokens  # both answers, each with its end of turn
    training = mean_token_nll(model, items, pad_id=pad_id(tokenizer), bf16=False)
    assert held_out.loss_per_token == pytest.approx(training, rel=1e-5)  # the trainer's loss is per token


def test_cutting_keeps_the_start_so_a_row_cut_before_its_answer_has_no_target(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    ids, labels = encode_chat(tok, MULTI_TURN)
    first_answer = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
    cut_ids, cut_labels = encode_chat(tok, MULTI_TURN, max_length=first_answer + 1)
    assert cut_ids == ids[: first_answer + 1] and cut_labels == labels[: first_answer + 1]
    assert encode_chat(tok, MULTI_TURN, max_length=first_answer)[1] == [IGNORE_INDEX] * first_answer


def test_pad_id_is_the_pad_token_else_end_of_sequence_else_an_error_naming_the_fix() -> None:
    assert pad_id(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    with pytest.raises(ValueError, match="set tokenizer.pad_token"):
        pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None))


def test_end_tokens_are_the_models_and_the_tokenizers_end_of_turn() -> None:
    tokenizer = SimpleNamespace(eos_token_id=7)
    assert end_token_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 7])), tokenizer) == [2, 7]
    assert end_token_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None)), tokenizer) == [7]
    assert end_token_ids(SimpleNamespace(), SimpleNamespace(eos_token_id=None)) == []


def test_the_chat_module_imports_no_torch() -> None:  # the serving pool imports it for the ids above
    code = "import sys, selftune.learners.chat; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_weight_0_turn_is_context_not_a_target(tokenizer_dir: Path) -> None:
    # An OpenAI fine-tuning row, parsed by ingest and written as the learner's train.jsonl writes it.
    tok = load_tokenizer(tokenizer_dir)
    parsed = parse_row({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Symbol of "}, {"type": "text", "text": "gold?"}]},
        {"role": "assistant", "content": "Silver is Ag.", "weight": 0},
        {"role": "user", "content": "No: gold?"},
        {"role": "assistant", "content": "Au", "weight": 1}]})
    row = json.loads(json.dumps({"id": 1, "messages": [m.as_dict() for m in parsed.messages]}))
    assert row["messages"][2] == {"role": "assistant", "content": "Silver is Ag.", "weight": 0}
    ids, labels = encode_chat(tok, row)
    targets = tok.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert targets == f"Au{tok.eos_token}"  # the weight-0 turn is not learned ...
    assert "Silver is Ag." in tok.decode(ids) and "Symbol of gold?" in tok.decode(ids)  # ... but is context
    unweighted = {"messages": [{k: v for k, v in m.items() if k != "weight"} for m in row["messages"]]}
    both = tok.decode([t for t, label in zip(*encode_chat(tok, unweighted)) if label != IGNORE_INDEX])
    assert both == f"Silver is Ag.{tok.eos_token}Au{tok.eos_token}"
