"""Sampling of a chat completion: what the request says, else what the answering generation's
``generation_config.json`` says, else ``[server]`` (vLLM's order)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from selftune.policies.config import ServerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float | None = None
    """0 means greedy decoding (deterministic). None here, in ``top_p`` or in ``top_k``: the request did not say;
    ``SamplingDefaults.fill`` fills them in before generation."""
    top_p: float | None = None
    top_k: int | None = None
    """0: off."""
    stop: tuple[str, ...] = ()
    """Strings that end the answer; the answer excludes them (OpenAI's ``stop``)."""
    seed: int | None = None
    logprobs: int | None = None
    """None: no log-probabilities; k: each answer token's log-probability and its k most likely alternatives
    (OpenAI's ``logprobs`` and ``top_logprobs``)."""


@dataclass(frozen=True)
class SamplingDefaults:
    """How a generation samples when a request does not say: what its ``generation_config.json`` says, read as
    vLLM reads it (``temperature``, ``top_p``, ``top_k``), and ``do_sample: false`` as greedy; None where it says
    nothing (or nothing valid), so that ``[server]`` decides."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    @classmethod
    def read(cls, directory: Path) -> SamplingDefaults:
        path = directory / "generation_config.json"
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        valid = {"temperature": lambda v: isinstance(v, int | float) and v >= 0,
                 "top_p": lambda v: isinstance(v, int | float) and 0 < v <= 1,
                 "top_k": lambda v: isinstance(v, int) and v >= 0}
        found = {}
        for key, check in valid.items():
            value = config.get(key)
            if value is not None and (isinstance(value, bool) or not check(value)):
                log.warning("%s: %s = %r is not a sampling setting serving can use; [server] decides it",
                            path, key, value)
            elif value is not None:
                found[key] = value
        if config.get("do_sample") is False:
            found["temperature"] = 0.0
        return cls(**found)

    def fill(self, params: SamplingParams, server: ServerConfig) -> SamplingParams:
        """``params`` with what the request left unsaid: this generation's setting, else ``[server]``'s."""
        def first(*values: Any) -> Any:
            return next(v for v in values if v is not None)

        return replace(params, temperature=clamp_temperature(first(params.temperature, self.temperature,
                                                                   server.default_temperature)),
                       top_p=first(params.top_p, self.top_p, server.default_top_p),
                       top_k=first(params.top_k, self.top_k, server.default_top_k))


def clamp_temperature(value: float) -> float:
    """OpenAI's temperature as a decoding choice: (nearly) 0 means greedy."""
    return 0.0 if not math.isfinite(value) or value < 1e-5 else value
