"""Evaluation: held-out loss and perplexity, choice likelihood, greedy answers, decode speed, size.

Plain functions over a model, its tokenizer and data. Losses count the assistant's tokens only, in the
model's own chat template, token-weighted over the whole set (long answers weigh more than short).
Forward passes run under bf16 autocast where the hardware computes bf16 (CPUs with AMX or AVX512-BF16
too); log-probabilities are taken in float32.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from selftune.policies.records import Message

from .lm import autocast

IGNORE = -100
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DEFAULT_SPEED_PROMPT = "Explain, step by step, how a hash table handles collisions."

Conversation = Sequence[Union[Message, Mapping[str, str]]]
Row = Union[tuple[str, str], Conversation]
"""A (prompt, response) pair, or messages whose final assistant turn is the target."""


@dataclass(frozen=True)
class LossResult:
    loss: float
    """Mean negative log-likelihood per target token (nats)."""
    perplexity: float
    tokens: int
    """Target tokens counted."""
    rows: int

    def to_dict(self) -> dict[str, float | int]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens, "rows": self.rows}


@dataclass(frozen=True)
class ChoiceResult:
    accuracy: float
    """Share of items whose correct choice scored best; nan if there were none."""
    passed: int
    total: int
    best: tuple[int, ...]
    """The best-scoring choice of each item."""


@dataclass(frozen=True)
class DecodeSpeed:
    tokens_per_s: float
    """Median over repeats of decode-only throughput (prefill subtracted)."""
    new_tokens: int
    runs: tuple[float, ...]
    """Each repeat's tokens/s."""

    def to_dict(self) -> dict[str, Any]:
        return {"tokens_per_s": self.tokens_per_s, "new_tokens": self.new_tokens, "runs": list(self.runs)}


# ---- loading and size ----------------------------------------------------------------------------


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, Any]:
    """A model directory as an eval-mode model and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters, tied ones counted once."""
    return sum(p.numel() for p in model.parameters())


def size_on_disk(model_dir: str | Path) -> int:
    """Bytes of the weight files in a model directory (the whole directory if it holds none)."""
    files = [p for p in Path(model_dir).rglob("*") if p.is_file()]
    weights = [p for p in files if p.name.endswith(WEIGHT_SUFFIXES)]
    return sum(p.stat().st_size for p in (weights or files))


# ---- encoding ------------------------------------------------------------------------------------


def as_messages(row: Row) -> list[dict[str, str]]:
    """A row as chat-template messages; the last one must be the assistant's target."""
    if isinstance(row, tuple) and len(row) == 2 and all(isinstance(x, str) for x in row):
        return [{"role": "user", "content": row[0]}, {"role": "assistant", "content": row[1]}]
    messages = [
        {"role": m.role, "content": m.content} if isinstance(m, Message) else {"role": m["role"], "content": m["content"]}
        for m in row  # type: ignore[union-attr]
    ]
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(f"a row must end with the assistant's answer, got roles {[m['role'] for m in messages]}")
    return messages


def encode_chat(tokenizer: Any, row: Row, max_length: int = 512) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and labels that keep only the final assistant turn.

    The target runs from the end of the generation prompt up to and including the end-of-turn token.
    Sequences longer than ``max_length`` lose their start (the answer is what we measure).
    """
    messages = as_messages(row)
    prefix_text = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    prefix = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    start = _common_prefix_length(prefix, full)
    end = len(full)
    eos = tokenizer.eos_token_id
    if eos is not None and eos in full[start:]:
        end = start + len(full[start:]) - full[start:][::-1].index(eos)  # stop after the last end-of-turn
    ids = full[:end]
    labels = [IGNORE] * start + ids[start:]
    if len(ids) > max_length:
        ids, labels = ids[-max_length:], labels[-max_length:]
    return ids, labels


def encode_text(tokenizer: Any, text: str, max_length: int = 512) -> tuple[list[int], list[int]]:
    """Plain language modelling: every token after the first is a target."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
    return ids, list(ids)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---- likelihood ----------------------------------------------------------------------------------


def autocast_for(model: torch.nn.Module, enabled: bool = True) -> AbstractContextManager[Any]:
    """bf16 autocast on the model's device (CPU included) where its hardware computes bf16 (``lm.fast_bf16``)."""
    return autocast(next(model.parameters()).device, enabled)


@torch.inference_mode()
def token_logprobs(
    model: PreTrainedModel,
    encoded: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int = 8,
    autocast: bool = True,
) -> list[tuple[float, int]]:
    """(sum of target log-probabilities, target token count) per encoded row, in input order."""
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    # Similar lengths share a batch, so little compute goes to padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    for batch in _chunks(order, batch_size):
        width = max(len(encoded[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq, lab = encoded[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(seq)] = 1
        with autocast_for(model, autocast):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        targets = labels[:, 1:].to(device)
        nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none"
        )
        counted = targets != IGNORE
        sums = (-nll * counted).sum(dim=1).tolist()
        counts = counted.sum(dim=1).tolist()
        for row, i in enumerate(batch):
            out[i] = (float(sums[row]), int(counts[row]))
    return out


def held_out_loss(
    model: PreTrainedModel,
    tokenizer: Any,
    rows: Sequence[Row],
    batch_size: int = 8,
    max_length: int = 512,
    autocast: bool = True,
) -> LossResult:
    """Token-weighted loss and perplexity on the assistant tokens of (prompt, response) rows."""
    encoded = [encode_chat(tokenizer, row, max_length) for row in rows]
    return _loss_of(model, tokenizer, encoded, batch_size, autocast)


def text_loss(
    model: PreTrainedModel,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 8,
    max_length: int = 512,
    autocast: bool = True,
) -> LossResult:
    """Token-weighted language-modelling loss on plain prose (an operator's foundation probe)."""
    encoded = [encode_text(tokenizer, text, max_length) for text in texts]
    return _loss_of(model, tokenizer, encoded, batch_size, autocast)


def _loss_of(
    model: PreTrainedModel, tokenizer: Any, encoded: list[tuple[list[int], list[int]]], batch_size: int, autocast: bool
) -> LossResult:
    scores = token_logprobs(model, encoded, _pad_id(tokenizer), batch_size, autocast)
    total = sum(s for s, _ in scores)
    tokens = sum(n for _, n in scores)
    if tokens == 0:
        raise ValueError(f"no target tokens in {len(encoded)} row(s): give rows with non-empty responses")
    loss = -total / tokens
    perplexity = math.exp(loss) if loss < 700 else math.inf
    return LossResult(loss, perplexity, tokens, len(encoded))


def score_choices(
    model: PreTrainedModel,
    tokenizer: Any,
    context: str | Conversation,
    choices: Sequence[str],
    normalize: bool = True,
    max_length: int = 512,
    autocast: bool = True,
) -> list[float]:
    """Log-likelihood of each choice as the assistant's answer; per token if ``normalize`` (fair to lengths)."""
    prefix = [{"role": "user", "content": context}] if isinstance(context, str) else as_messages_prefix(context)
    encoded = [encode_chat(tokenizer, [*prefix, {"role": "assistant", "content": c}], max_length) for c in choices]
    scores = token_logprobs(model, encoded, _pad_id(tokenizer), batch_size=len(choices) or 1, autocast=autocast)
    return [s / max(n, 1) if normalize else s for s, n in scores]


def as_messages_prefix(context: Conversation) -> list[dict[str, str]]:
    return [
        {"role": m.role, "content": m.content} if isinstance(m, Message) else {"role": m["role"], "content": m["content"]}
        for m in context
    ]


def choice_accuracy(
    model: PreTrainedModel,
    tokenizer: Any,
    items: Sequence[tuple[str | Conversation, Sequence[str], int]],
    normalize: bool = True,
    autocast: bool = True,
) -> ChoiceResult:
    """For each (context, choices, correct index): does the correct choice score best? (Golden prompts.)"""
    best = []
    for context, choices, _ in items:
        scores = score_choices(model, tokenizer, context, choices, normalize=normalize, autocast=autocast)
        best.append(max(range(len(scores)), key=lambda i: scores[i]))
    passed = sum(int(b == correct) for b, (_, _, correct) in zip(best, items))
    accuracy = passed / len(items) if items else math.nan
    return ChoiceResult(accuracy, passed, len(items), tuple(best))


# ---- generation and speed ------------------------------------------------------------------------


def generate_answers(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: Sequence[str | Conversation],
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers to prompts, in the model's chat template (left-padded batches)."""
    return [text for text, _ in _generate(model, tokenizer, prompts, max_new_tokens, batch_size)]


def complete_answers(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: Sequence[str | Conversation],
    max_new_tokens: int = 160,
    batch_size: int = 16,
) -> list[str | None]:
    """Greedy answers that the model ended itself within ``max_new_tokens``; None for the others.

    A cut-off answer must not be trained or scored as a whole turn: its end-of-turn token is not the
    model's, and learning it teaches the model to stop mid-sentence.
    """
    return [text if finished else None for text, finished in _generate(model, tokenizer, prompts, max_new_tokens, batch_size)]


@torch.inference_mode()
def _generate(
    model: PreTrainedModel, tokenizer: Any, prompts: Sequence[str | Conversation], max_new_tokens: int, batch_size: int,
) -> list[tuple[str, bool]]:
    """(answer, ended by an end-of-turn token) per prompt."""
    device = next(model.parameters()).device
    stops = _end_token_ids(model, tokenizer)
    out_rows: list[tuple[str, bool]] = []
    for batch in _chunks(list(prompts), batch_size):
        encoded = [_generation_prompt_ids(tokenizer, p) for p in batch]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(batch), width), _pad_id(tokenizer), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(encoded):
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=_pad_id(tokenizer),
        )
        for row in out.tolist():
            new = row[width:]
            out_rows.append((tokenizer.decode(new, skip_special_tokens=True).strip(), any(t in stops for t in new)))
    return out_rows


def _end_token_ids(model: PreTrainedModel, tokenizer: Any) -> set[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {int(i) for i in ids if i is not None}


@torch.inference_mode()
def decode_tokens_per_second(
    model: PreTrainedModel,
    tokenizer: Any,
    prompt: str = DEFAULT_SPEED_PROMPT,
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    autocast: bool = False,
) -> DecodeSpeed:
    """Greedy decode throughput: (N-1) / (time for N new tokens - time for 1), median over repeats.

    Subtracting a one-token run removes the prefill, so this is the per-token cost a user waits for.
    End-of-sequence is ignored so that every run decodes exactly N tokens.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens = {new_tokens}: measure at least 2 tokens")
    device = next(model.parameters()).device
    ids = torch.tensor([_generation_prompt_ids(tokenizer, prompt)], device=device)

    def timed(n: int) -> float:
        with autocast_for(model, autocast):
            start = time.perf_counter()
            model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=_pad_id(tokenizer),
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start

    for _ in range(warmup):
        timed(new_tokens)
    runs = []
    for _ in range(repeats):
        prefill = timed(1)
        full = timed(new_tokens)
        runs.append((new_tokens - 1) / max(full - prefill, 1e-9))
    return DecodeSpeed(statistics.median(runs), new_tokens, tuple(runs))


def _generation_prompt_ids(tokenizer: Any, prompt: str | Conversation) -> list[int]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else as_messages_prefix(prompt)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token: set tokenizer.pad_token")
    return int(pad)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), max(size, 1)):
        yield items[start : start + size]
