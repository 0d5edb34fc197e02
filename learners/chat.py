"""Conversations as the model sees them: the one chat encoder, and the token ids every generation needs.

The encoder (``encode_chat``) serves training, evaluation and the Fisher estimate alike. Its label mask:
every assistant turn is a target, its end-of-turn token included, unless it has ``weight`` 0 (OpenAI
fine-tuning's "do not train on this turn": it stays as context); system, user and template tokens are
``IGNORE_INDEX`` (and so is padding, in a batch). Training learns exactly the tokens that evaluation
scores, so on a multi-turn row the training loss and the held-out loss measure the same thing.

Torch-free on purpose: the serving pool imports it for the end-of-turn and pad ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

from selftune.policies.records import Message

IGNORE_INDEX = -100
"""Label of a token that carries no loss (prompt, template, padding)."""

Conversation = Sequence[Union[Message, Mapping[str, Any]]]
Row = Union[Mapping[str, Any], tuple[str, str], Conversation]
"""A learner row (``{"messages": [...]}`` or ``{"prompt", "response"}``), a (prompt, response) pair, or messages."""


def as_messages(row: Row) -> list[dict[str, Any]]:
    """A row as chat-template messages; the last one must be the assistant's answer."""
    if isinstance(row, Mapping):
        if "messages" in row:
            messages = conversation_messages(row["messages"])
        elif "prompt" in row and "response" in row:
            messages = [{"role": "user", "content": str(row["prompt"])},
                        {"role": "assistant", "content": str(row["response"])}]
        else:
            raise ValueError(f"row {row.get('id', '?')!r} has neither 'messages' nor 'prompt'+'response': {sorted(row)}")
    elif isinstance(row, tuple) and len(row) == 2 and all(isinstance(x, str) for x in row):
        messages = [{"role": "user", "content": row[0]}, {"role": "assistant", "content": row[1]}]
    else:
        messages = conversation_messages(row)
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(f"a row must end with the assistant's answer, got roles {[m['role'] for m in messages]}")
    return messages


def conversation_messages(messages: Conversation) -> list[dict[str, Any]]:
    """``Message`` objects or mappings as plain ``{"role", "content"}`` dicts (plus ``weight``, where set)."""
    return [
        (m if isinstance(m, Message) else Message(str(m["role"]), str(m["content"]), m.get("weight"))).as_dict()
        for m in messages
    ]


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its trained assistant turns (end-of-turn token
    included; a turn with ``weight`` 0 has none).

    Each turn's span starts where the template's generation prompt for it ends and stops where the
    template's rendering of that turn ends, trailing whitespace excluded: exactly what the model must
    produce when it answers.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: use an instruct model's tokenizer (with chat_template)")
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight") == 0:
            continue
        prompt = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        turn = render(messages[: i + 1], tokenize=False)
        if full.startswith(turn) and turn.startswith(prompt):
            start, end = len(prompt), len(turn.rstrip())
        else:  # a template that rewrites earlier turns: locate the answer text itself
            start = full.rfind(message["content"])
            end = start + len(message["content"])
            if start < 0:
                continue
            eos = getattr(tokenizer, "eos_token", None)
            if eos and full.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
    return full, spans


def encode_chat(tokenizer: Any, row: Row, max_length: int = 512) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: the ids on every trained assistant turn, -100 elsewhere.

    The sequence ends with the last assistant turn (what a template renders after it carries no loss and,
    the model being causal, changes no logit before it) and is cut to its first ``max_length`` tokens: a
    turn is learned and scored in the context it had, so a row cut before any answer has no target.
    """
    text, spans = assistant_spans(tokenizer, as_messages(row))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for k, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a and b <= e for s, e in spans):
            labels[k] = ids[k]
    end = max((k + 1 for k, label in enumerate(labels) if label != IGNORE_INDEX), default=len(ids))
    end = min(end, max_length)
    return ids[:end], labels[:end]


def generation_prompt_ids(tokenizer: Any, prompt: str | Conversation) -> list[int]:
    """A prompt (a user message, or a conversation) in the chat template, up to the assistant's turn.

    A tokenizer without a chat template (a base model) gets the bare text of the messages.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else conversation_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer("\n".join(m["content"] for m in messages))["input_ids"])


def pad_id(tokenizer: Any) -> int:
    """The id that fills padding: the tokenizer's pad token, else its end-of-sequence token.

    Padding is masked out of attention and loss, so any id of the vocabulary does, and end-of-sequence is one
    every chat tokenizer has. A tokenizer with neither is an error naming the fix, not a silent 0: it cannot
    end an answer either, so serving it would only hide the problem from training and evaluation.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has neither a pad nor an end-of-sequence token: set tokenizer.pad_token "
            "(e.g. to the end-of-turn token) and save the tokenizer with the model")
    return int(pad)


def end_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end an answer: the model's configured end tokens plus the tokenizer's end-of-turn token."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids.append(tokenizer.eos_token_id)
    return sorted({int(i) for i in ids if i is not None})
