"""Evaluation: held-out loss and perplexity, choice likelihood, greedy answers, size (decode speed: ``speed``).

Plain functions over a model, its tokenizer and data. Losses count the tokens of every assistant turn, in
the model's own chat template (``chat.encode_chat``, the encoder training uses), summed over the whole set
(long answers weigh more than short) and divided by the UTF-8 bytes of the text those tokens stand for:
nats per byte (``LOSS_UNIT``), so that models with different tokenizers (a trimmed vocabulary, fewer and
longer tokens) are measured on one scale. The per-token mean stays beside it, labelled.
Forward passes run under bf16 autocast where the hardware computes bf16 (CPUs with AMX or AVX512-BF16
too); log-probabilities are taken in float32.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import decoders
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from selftune.policies.gates import LOSS_UNIT, PER_TOKEN_LOSS_UNIT

from .chat import (
    IGNORE_INDEX, Conversation, Row, conversation_messages, encode_chat, end_token_ids, generation_prompt_ids, pad_id,
)
from .data import Encoded, batches
from .lm import autocast, target_logits, to_device


@dataclass(frozen=True)
class LossResult:
    """Held-out loss over the target tokens of a set of rows: per byte (the one to compare), per token beside it."""

    loss: float
    """Nats per UTF-8 byte of target text (``LOSS_UNIT``): ``nll / bytes``. Comparable across tokenizers."""
    nll: float
    """Summed negative log-likelihood of the target tokens (nats), the end-of-turn token's included."""
    tokens: int
    """Target tokens scored."""
    bytes: int
    """UTF-8 bytes of the text the target tokens stand for (special tokens count 0: ``target_bytes``)."""
    rows: int
    loss_per_token: float
    """Mean NLL per target token (nats/token): depends on the tokenizer, so compare it only within one."""
    perplexity: float
    """Per-token perplexity, ``exp(loss_per_token)``."""

    @property
    def bits_per_byte(self) -> float:
        """``loss`` in bits per byte, the unit the reports show."""
        return self.loss / math.log(2)

    def to_dict(self) -> dict[str, float | int | str]:
        return {"loss": self.loss, "unit": LOSS_UNIT, "nll": self.nll, "tokens": self.tokens, "bytes": self.bytes,
                "rows": self.rows, "loss_per_token": self.loss_per_token, "per_token_unit": PER_TOKEN_LOSS_UNIT,
                "perplexity": self.perplexity}


@dataclass(frozen=True)
class ChoiceResult:
    accuracy: float
    """Share of items whose correct choice scored best; nan if there were none."""
    passed: int
    total: int
    best: tuple[int, ...]
    """The best-scoring choice of each item."""


# ---- loading and size ----------------------------------------------------------------------------


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, Any]:
    """A model directory as an eval-mode model and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters stored, each tensor once: ``parameters()`` skips repeats, so tied embeddings count once."""
    return sum(p.numel() for p in model.parameters())


def first_non_finite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or Inf, or None: a broken model is named, not scored."""
    return next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)


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
    sums = torch.zeros(len(encoded), dtype=torch.float64)
    counts = torch.zeros(len(encoded), dtype=torch.long)
    # batches() puts similar lengths together, so little compute goes to padding; row ids bring results home
    items = [Encoded(ids, labels, row_id=i) for i, (ids, labels) in enumerate(encoded)]
    for batch in batches(items, batch_size, pad_id):
        with autocast_for(model, autocast):
            logits, targets = target_logits(model, to_device(batch, device))  # the head runs on targets only
        keep = batch["labels"][:, 1:] != IGNORE_INDEX
        owner = torch.tensor(batch["ids"])[:, None].expand_as(keep)[keep]  # the row of each target token
        logprobs = -F.cross_entropy(logits.float(), targets, reduction="none")
        sums.index_add_(0, owner, logprobs.double().cpu())
        counts.index_add_(0, owner, torch.ones_like(owner))
    return [(float(s), int(n)) for s, n in zip(sums.tolist(), counts.tolist())]


def held_out_loss(
    model: PreTrainedModel,
    tokenizer: Any,
    rows: Sequence[Row],
    batch_size: int = 8,
    max_length: int = 512,
    autocast: bool = True,
) -> LossResult:
    """Loss on the assistant turns of rows (all of them: ``chat.encode_chat``), in nats per byte of their text.

    ``loss`` is the summed NLL of every target token divided by the UTF-8 bytes those tokens decode to
    (``target_bytes``), over the whole set. The end-of-turn token is a target: its NLL is in the sum (ending
    the answer is part of answering) while, being a special token, it adds no byte; so two tokenizers that
    both end a turn with a special token are divided by the answer text alone. ``loss_per_token`` and
    ``perplexity`` are the per-token figures, for comparisons within one tokenizer.
    """
    encoded = [encode_chat(tokenizer, row, max_length) for row in rows]
    scores = token_logprobs(model, encoded, pad_id(tokenizer), batch_size, autocast)
    nll = -sum(s for s, _ in scores)
    tokens = sum(n for _, n in scores)
    if tokens == 0:
        raise ValueError(
            f"no target tokens in {len(encoded)} row(s): give rows with non-empty answers within "
            f"max_length={max_length} tokens")
    size = sum(target_bytes(tokenizer, ids, labels) for ids, labels in encoded)
    if size == 0:
        raise ValueError(
            f"the {tokens} target token(s) of {len(encoded)} row(s) are all special tokens (no text to measure "
            "a loss per byte on): give rows with non-empty answers")
    per_token = nll / tokens
    perplexity = math.exp(per_token) if per_token < 700 else math.inf
    return LossResult(loss=nll / size, nll=nll, tokens=tokens, bytes=size, rows=len(encoded),
                      loss_per_token=per_token, perplexity=perplexity)


def row_losses(model: PreTrainedModel, tokenizer: Any, rows: Sequence[Row], max_length: int = 512) -> list[float | None]:
    """Each row's loss in nats per byte of its answers, as ``held_out_loss`` measures a set (None: nothing to
    score within ``max_length``)."""
    encoded = [encode_chat(tokenizer, row, max_length) for row in rows]
    scores = token_logprobs(model, encoded, pad_id(tokenizer))
    out: list[float | None] = []
    for (ids, labels), (logprob, tokens) in zip(encoded, scores, strict=True):
        size = target_bytes(tokenizer, ids, labels)
        out.append(-logprob / size if tokens and size else None)
    return out


def target_counts(tokenizer: Any, rows: Sequence[Row], max_length: int = 512) -> tuple[int, int]:
    """(target tokens, target bytes) of rows as ``held_out_loss`` counts them, without a model.

    The ratio converts a per-token loss measured on the same rows and tokenizer to a per-byte one
    (``loss_per_token * tokens / bytes``): how a record written per token is brought to ``LOSS_UNIT``.
    """
    tokens = size = 0
    for row in rows:
        ids, labels = encode_chat(tokenizer, row, max_length)
        tokens += sum(1 for label in labels[1:] if label != IGNORE_INDEX)
        size += target_bytes(tokenizer, ids, labels)
    return tokens, size


def target_bytes(tokenizer: Any, ids: Sequence[int], labels: Sequence[int]) -> int:
    """UTF-8 bytes of the text that the scored target tokens of one encoded row stand for.

    The tokens counted are those the loss scores: every labelled position but the first (nothing predicts
    it). Special tokens (end of turn, ...) count 0 bytes: they are markup, not text, and tokenizers agree on
    the text, not on their markup. For a byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) each token's
    bytes are exact, so a token that splits a multi-byte character counts its own share; other tokenizers
    are measured by decoding each run of target tokens (special tokens skipped).
    """
    positions = [k for k in range(1, len(labels)) if labels[k] != IGNORE_INDEX]
    if not positions:
        return 0
    special = _special_ids(tokenizer)
    if _is_byte_level(tokenizer):
        targets = [ids[k] for k in positions]
        pieces = tokenizer.convert_ids_to_tokens(targets)
        added = tokenizer.added_tokens_decoder
        return sum(0 if token_id in special else
                   len(added[token_id].content.encode("utf-8")) if token_id in added else _byte_level_length(piece)
                   for token_id, piece in zip(targets, pieces))
    runs: list[list[int]] = []
    for k in positions:  # runs of consecutive targets decode as their text (a lone byte-fallback token would not)
        if runs and runs[-1][1] == k - 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return sum(len(tokenizer.decode([i for i in ids[a : b + 1] if i not in special], skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False).encode("utf-8")) for a, b in runs)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as one printable character (the table byte-level BPE spells tokens in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_LEVEL_CHARS = frozenset(_bytes_to_unicode().values())
"""The 256 characters of the byte-level alphabet: each stands for exactly one byte."""
_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def _byte_level_length(piece: str) -> int:
    # every character of a byte-level token is one byte; any other (none expected) counts as its own UTF-8
    return sum(1 if c in BYTE_LEVEL_CHARS else len(c.encode("utf-8")) for c in piece)


def _is_byte_level(tokenizer: Any) -> bool:
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    return isinstance(decoder, decoders.ByteLevel)


def token_bytes(tokenizer: Any, token_ids: Sequence[int]) -> list[bytes]:
    """Each token's own UTF-8 bytes (OpenAI's logprobs ``bytes``): exact for a byte-level BPE tokenizer, even for a
    token that splits a character; other tokenizers' tokens as they decode alone."""
    if not _is_byte_level(tokenizer):
        return [tokenizer.decode([i], clean_up_tokenization_spaces=False).encode("utf-8") for i in token_ids]
    added, byte_of = tokenizer.added_tokens_decoder, _BYTE_OF_CHAR
    return [added[i].content.encode("utf-8") if i in added else
            b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode("utf-8") for c in piece)
            for i, piece in zip(token_ids, tokenizer.convert_ids_to_tokens(list(token_ids)))]


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids of the special tokens: the named ones and every added token marked special."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {*tokenizer.all_special_ids, *(i for i, token in added.items() if getattr(token, "special", False))}


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
    prefix = [{"role": "user", "content": context}] if isinstance(context, str) else conversation_messages(context)
    whole = [encode_chat(tokenizer, [*prefix, {"role": "assistant", "content": c}], max_length=sys.maxsize) for c in choices]
    encoded = [_final_turn(ids, labels, max_length) for ids, labels in whole]
    scores = token_logprobs(model, encoded, pad_id(tokenizer), batch_size=len(choices) or 1, autocast=autocast)
    return [s / max(n, 1) if normalize else s for s, n in scores]


def _final_turn(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Labels of the final assistant turn alone, in the last ``max_length`` tokens.

    Only the choice is compared: an assistant turn of the context would add the same tokens to every choice
    (and, per token, change their order), and a long context loses its start rather than the choice.
    """
    start = len(labels)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    labels = [IGNORE_INDEX] * start + labels[start:]
    return ids[-max_length:], labels[-max_length:]


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


# ---- generation ----------------------------------------------------------------------------------


def generate_answers(
    model: PreTrainedModel,
    tokenizer: Any,
    prompts: Sequence[str | Conversation],
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers to prompts, in the model's chat template (left-padded batches)."""
    return [text for text, _ in greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)]


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
    answers = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    return [text if finished else None for text, finished in answers]


@torch.inference_mode()
def greedy_generate(
    model: PreTrainedModel, tokenizer: Any, prompts: Sequence[str | Conversation], max_new_tokens: int, batch_size: int,
) -> list[tuple[str, bool]]:
    """(answer, ended by an end-of-turn token) per prompt: greedy decoding in the chat template, stopping at
    the model's end tokens and the tokenizer's end of turn (``chat.end_token_ids``)."""
    device = next(model.parameters()).device
    stops = end_token_ids(model, tokenizer)
    pad = pad_id(tokenizer)
    out_rows: list[tuple[str, bool]] = []
    for batch in _chunks(list(prompts), batch_size):
        encoded = [generation_prompt_ids(tokenizer, p) for p in batch]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(encoded):
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=stops or None, pad_token_id=pad,
        )
        for row in out.tolist():
            new = row[width:]
            out_rows.append((tokenizer.decode(new, skip_special_tokens=True).strip(), any(t in stops for t in new)))
    return out_rows


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), max(size, 1)):
        yield items[start : start + size]
