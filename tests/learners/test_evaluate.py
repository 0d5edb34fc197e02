"""Evaluation on the tiny Llama: assistant-only token-weighted loss, choice scoring, generation, speed, size."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from selftune.learners.evaluate import (
    choice_accuracy,
    complete_answers,
    decode_tokens_per_second,
    encode_chat,
    generate_answers,
    held_out_loss,
    load_model,
    parameter_count,
    score_choices,
    size_on_disk,
    text_loss,
)
from selftune.policies.records import Message

PAIRS = [
    ("What is a list in Python?", "A mutable sequence of items."),
    ("What does len() return?", "The number of items in a container, such as a list or a string."),
    ("Define a tuple.", "An immutable sequence."),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    torch.manual_seed(0)
    return load_model(tiny_model_dir)


def test_encode_chat_labels_only_the_answer_and_its_end_of_turn(tiny) -> None:
    _, tokenizer = tiny
    ids, labels = encode_chat(tokenizer, PAIRS[0])
    target = [t for t, lab in zip(ids, labels) if lab != -100]
    assert tokenizer.decode(target) == "A mutable sequence of items.<|im_end|>"
    assert ids[: len(ids) - len(target)] == tokenizer(
        tokenizer.apply_chat_template([{"role": "user", "content": PAIRS[0][0]}], add_generation_prompt=True,
                                      tokenize=False), add_special_tokens=False)["input_ids"]
    # Messages work the same as a pair.
    as_messages = (Message("user", PAIRS[0][0]), Message("assistant", PAIRS[0][1]))
    assert encode_chat(tokenizer, as_messages) == (ids, labels)
    with pytest.raises(ValueError, match="must end with the assistant"):
        encode_chat(tokenizer, [{"role": "user", "content": "hi"}])


def test_held_out_loss_is_token_weighted_and_matches_transformers(tiny) -> None:
    model, tokenizer = tiny
    result = held_out_loss(model, tokenizer, PAIRS, batch_size=2, autocast=False)
    # Token-weighted mean of each row's own (transformers-computed) mean loss.
    total, tokens = 0.0, 0
    for pair in PAIRS:
        ids, labels = encode_chat(tokenizer, pair)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        n = sum(1 for lab in labels[1:] if lab != -100)
        total += out.loss.item() * n
        tokens += n
    assert result.tokens == tokens and result.rows == 3
    assert result.loss == pytest.approx(total / tokens, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    # Padding does not change the answer, and bf16 autocast stays close to float32.
    assert held_out_loss(model, tokenizer, PAIRS, batch_size=1, autocast=False).loss == pytest.approx(result.loss, rel=1e-5)
    assert held_out_loss(model, tokenizer, PAIRS, batch_size=3).loss == pytest.approx(result.loss, rel=2e-2)


def test_text_loss_counts_every_token_but_the_first(tiny) -> None:
    model, tokenizer = tiny
    text = "The quick brown fox jumps over the lazy dog."
    result = text_loss(model, tokenizer, [text], autocast=False)
    assert result.tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"]) - 1
    assert math.isfinite(result.loss) and result.loss > 0


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


def test_decode_speed_and_size(tiny, tiny_model_dir: Path) -> None:
    model, tokenizer = tiny
    speed = decode_tokens_per_second(model, tokenizer, new_tokens=4, repeats=2, warmup=1)
    assert len(speed.runs) == 2 and speed.new_tokens == 4
    assert math.isfinite(speed.tokens_per_s) and speed.tokens_per_s > 0
    config = model.config
    per_layer = (
        2 * config.hidden_size * config.hidden_size  # q, o
        + 2 * config.hidden_size * config.num_key_value_heads * config.head_dim  # k, v
        + 3 * config.hidden_size * config.intermediate_size  # gate, up, down
        + 2 * config.hidden_size  # norms
    )
    expected = config.vocab_size * config.hidden_size + config.num_hidden_layers * per_layer + config.hidden_size
    assert parameter_count(model) == expected  # tied embeddings counted once
    assert size_on_disk(tiny_model_dir) == pytest.approx(4 * expected, rel=0.01)  # float32 safetensors
    with pytest.raises(ValueError, match="at least 2"):
        decode_tokens_per_second(model, tokenizer, new_tokens=1)
