"""Decode speed of two models, timed together so that the machine's load falls on both alike.

A model's decode speed is only meaningful next to another's: a number timed minutes apart measures whatever
else the machine was doing then as much as the model. So the two are timed interleaved, A, B, B, A, A, B, ...
(which goes first alternates each round, so neither always runs on a cache the other warmed or a core the other
cooled), and compared by their medians over the rounds. Two models whose parameters have the same names,
shapes and dtypes do the same arithmetic per token: their speeds are equal by construction, and
``shape_difference`` says so before any timing noise can say otherwise.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from .chat import generation_prompt_ids, pad_id
from .evaluate import autocast_for

DEFAULT_SPEED_PROMPT = "Explain, step by step, how a hash table handles collisions."


@dataclass(frozen=True)
class DecodeSpeed:
    tokens_per_s: float
    """Median of ``runs``: decode-only throughput (the prefill left out)."""
    new_tokens: int
    runs: tuple[float, ...]
    """Each timed decode's tokens/s (one per round and prompt), in the order timed."""

    def to_dict(self) -> dict[str, Any]:
        return {"tokens_per_s": self.tokens_per_s, "new_tokens": self.new_tokens, "runs": list(self.runs)}


@dataclass(frozen=True)
class SpeedComparison:
    """Model B's decode speed against model A's, timed interleaved."""

    a: DecodeSpeed
    b: DecodeSpeed
    rounds: int
    shape_difference: str
    """Where the two models' parameters differ ('' if names, shapes and dtypes all match: ``same_shapes``)."""

    @property
    def ratio(self) -> float:
        """B's median tokens/s over A's: below 1, B decodes slower."""
        return self.b.tokens_per_s / self.a.tokens_per_s

    @property
    def same_shapes(self) -> bool:
        """The same parameters (names, shapes, dtypes): the same work per token, so the same speed by construction."""
        return not self.shape_difference

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a.to_dict(), "b": self.b.to_dict(), "ratio": self.ratio, "rounds": self.rounds,
                "same_shapes": self.same_shapes, "shape_difference": self.shape_difference}


def shape_difference(model_a: torch.nn.Module, model_b: torch.nn.Module) -> str:
    """The first parameter whose name, shape or dtype differs between the two models ('' if none does)."""
    a = {name: (tuple(p.shape), p.dtype) for name, p in model_a.named_parameters()}
    b = {name: (tuple(p.shape), p.dtype) for name, p in model_b.named_parameters()}
    for name in sorted(a.keys() | b.keys()):
        if name not in b:
            return f"{name} only in the first model ({len(a)} parameter tensors against {len(b)})"
        if name not in a:
            return f"{name} only in the second model ({len(a)} parameter tensors against {len(b)})"
        if a[name] != b[name]:
            (shape_a, dtype_a), (shape_b, dtype_b) = a[name], b[name]
            return f"{name}: {list(shape_a)} {dtype_a} against {list(shape_b)} {dtype_b}"
    return ""


@torch.inference_mode()
def compare_decode_speed(
    model_a: PreTrainedModel,
    model_b: PreTrainedModel,
    tokenizer_a: Any,
    tokenizer_b: Any | None = None,
    *,
    prompts: Sequence[str] = (DEFAULT_SPEED_PROMPT,),
    new_tokens: int = 32,
    rounds: int = 6,
    warmup: int = 1,
    autocast: bool = False,
) -> SpeedComparison:
    """Greedy decode throughput of both models, interleaved over ``rounds`` (who goes first alternates: with an
    even number each goes first as often), each round timing every prompt on each; their medians compared
    (``SpeedComparison.ratio``: B over A).

    A run's throughput is (N-1) / the time from its first new token to its last: the per-token cost a user waits
    for, the prefill left out. End-of-sequence is ignored so that every run decodes exactly N tokens.
    ``tokenizer_b``: B's own, if its vocabulary differs (default: A's).
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens = {new_tokens}: measure at least 2 tokens")
    if rounds < 1 or not prompts:
        raise ValueError(f"rounds = {rounds}, {len(prompts)} prompt(s): time at least 1 round of 1 prompt")
    timers = (_Timer(model_a, tokenizer_a, prompts, autocast),
              _Timer(model_b, tokenizer_b or tokenizer_a, prompts, autocast))
    for timer in timers:
        for _ in range(warmup):
            timer.tokens_per_s(0, new_tokens)
    runs: tuple[list[float], list[float]] = ([], [])
    for round_ in range(rounds):
        order = (0, 1) if round_ % 2 == 0 else (1, 0)
        for which in order:
            for prompt in range(len(prompts)):
                runs[which].append(timers[which].tokens_per_s(prompt, new_tokens))
    a, b = (DecodeSpeed(statistics.median(r), new_tokens, tuple(r)) for r in runs)
    return SpeedComparison(a, b, rounds, shape_difference(model_a, model_b))


class _StepClock(BaseStreamer):
    """When ``generate`` hands over each token: the prompt first, then each new token as it is chosen."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: Any) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


class _Timer:
    """Greedy decodes of one model on its own encoding of the prompts, timed token by token."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, prompts: Sequence[str], autocast: bool) -> None:
        self.model, self.autocast, self.pad = model, autocast, pad_id(tokenizer)
        self.device = next(model.parameters()).device
        self.ids = [torch.tensor([generation_prompt_ids(tokenizer, p)], device=self.device) for p in prompts]

    def tokens_per_s(self, prompt: int, new_tokens: int) -> float:
        """(N-1) / the time from the first new token to the last: decode only, the prefill (before the first)
        left out, as one ``generate`` call measures it."""
        ids, clock = self.ids[prompt], _StepClock()
        with autocast_for(self.model, self.autocast):
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=self.pad, streamer=clock)
        first, last = clock.stamps[1], clock.stamps[-1]  # stamps[0]: the prompt, handed over before the prefill
        return (len(clock.stamps) - 2) / max(last - first, 1e-9)
