"""Serving the champions: one loaded model per branch, the generation its ``champion`` alias names.

Every request asks the pool for its branch's champion; the pool reads the alias (one indexed
query) and, if it moved since the model was loaded, loads the new generation first. So a newly
promoted champion answers the very next request, without a restart; ``refresh`` does the same
ahead of time from the service's housekeeping loop, so that request rarely pays for the load.
A request that is already generating keeps the model it started with until it finishes.

Generation is blocking torch work: callers run it in a worker thread. One lock per loaded model
serialises generation (on a small CPU, concurrent generate() calls only share the same cores).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selftune.learners.chat import end_token_ids, generation_prompt_ids, pad_id  # torch-free
from selftune.policies.errors import InvalidRecordError, NotFoundError
from selftune.policies.records import CHAMPION

from selftune.daemon.context import Context
from selftune.daemon.service.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    """0 means greedy decoding (deterministic)."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    """Strings that end the answer; the answer excludes them (OpenAI's ``stop``)."""
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    """"stop" (end of turn or a stop string) or "length" (max_new_tokens reached)."""
    prompt_tokens: int
    completion_tokens: int
    generation_id: int
    seconds: float


class Champion:
    """One generation loaded for serving."""

    def __init__(self, branch: str, generation_id: int, directory: Path) -> None:
        from selftune.learners.evaluate import load_model  # torch: only where a model is served

        started = time.perf_counter()
        self.branch = branch
        self.generation_id = generation_id
        self.directory = directory
        self.model, self.tokenizer = load_model(directory)
        self.lock = threading.Lock()
        self.load_seconds = time.perf_counter() - started
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self._stop_ids = end_token_ids(self.model, self.tokenizer)

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The conversation in the model's chat template, ending with the assistant's generation prompt."""
        return generation_prompt_ids(self.tokenizer, messages)

    def budget(self, prompt_tokens: int, wanted: int) -> int:
        """New tokens that fit beside the prompt in the model's context; an error naming the fix if none do."""
        if self.max_positions is None:
            return wanted
        room = self.max_positions - prompt_tokens
        if room < 1:
            raise InvalidRecordError(
                f"the conversation has {prompt_tokens} tokens, and generation {self.generation_id} reads at most "
                f"{self.max_positions}: shorten the messages")
        return min(wanted, room)

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 on_text: Callable[[str], None] | None = None,
                 cancelled: threading.Event | None = None) -> Completion:
        """Generate an answer (blocking). ``on_text`` receives the answer's text piece by piece as it grows;
        setting ``cancelled`` stops generation at the next token."""
        import torch  # torch and transformers: only where a model is served
        from transformers import StoppingCriteria, StoppingCriteriaList

        stream = _TextStream(self.tokenizer, params.stop, on_text)
        cancelled = cancelled or threading.Event()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                done = cancelled.is_set() or stream.stopped
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        max_new = self.budget(len(prompt_ids), params.max_new_tokens)
        sampling = params.temperature > 0
        options: dict[str, Any] = {"do_sample": sampling}
        if sampling:
            options.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        ids = torch.tensor([prompt_ids])
        with self.lock, torch.inference_mode():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            started = time.perf_counter()
            output = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                eos_token_id=self._stop_ids or None, pad_token_id=pad_id(self.tokenizer), streamer=stream,
                stopping_criteria=StoppingCriteriaList([_Stop()]), **options)
            seconds = time.perf_counter() - started
        new_tokens = output[0, len(prompt_ids):].tolist()
        stream.finish()
        ended_by_model = bool(new_tokens) and new_tokens[-1] in self._stop_ids
        finish = "stop" if stream.stopped or ended_by_model or len(new_tokens) < max_new else "length"
        return Completion(stream.text, finish, len(prompt_ids), len(new_tokens), self.generation_id, seconds)


class _TextStream:
    """A transformers streamer that decodes the new tokens as they come and hands on the text that is
    final: a tail that could still turn into a stop string is held back until it cannot."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], on_text: Callable[[str], None] | None) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.on_text = on_text
        self.tokens: list[int] = []
        self.text = ""
        """The answer so far, as handed on."""
        self.stopped = False
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands the streamer the prompt itself
            self._prompt_seen = True
            return
        if self.stopped:
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        self._advance(final=False)

    def end(self) -> None:
        pass  # finish() runs after generate() returns, so that it sees the last token too

    def finish(self) -> None:
        if not self.stopped:
            self._advance(final=True)

    def _advance(self, final: bool) -> None:
        decoded = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()
        if not final and decoded.endswith("\ufffd"):
            return  # a multi-byte character is split across tokens: wait for its rest
        hits = [i for i in (decoded.find(s) for s in self.stops) if i >= 0]
        if hits:
            decoded, final, self.stopped = decoded[: min(hits)], True, True
        visible = decoded if final else decoded[: len(decoded) - _held_back(decoded, self.stops)]
        # Decoding more tokens can, rarely, rewrite earlier text (tokenizer clean-up); what was handed on
        # stays the answer's start, so the streamed and the logged answer are the same text.
        if len(visible) > len(self.text) and visible.startswith(self.text):
            piece, self.text = visible[len(self.text):], visible
            if self.on_text is not None:
                self.on_text(piece)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is the start of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest


class ChampionPool:
    """The loaded champion of each branch that has been asked for (and of the default branch)."""

    def __init__(self, context: Context, metrics: Metrics | None = None, threads: int = 0) -> None:
        self.context = context
        self.metrics = metrics
        self.threads = threads
        self._loaded: dict[str, Champion] = {}
        self._load_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def champion_id(self, branch: str) -> int:
        """The generation the branch's champion alias names now; ``NotFoundError`` naming the fix if none."""
        with self.context.store.transaction() as tx:
            alias = tx.aliases.get(branch, CHAMPION)
            if alias is None:
                known = [b.name for b in tx.branches.list()]
        if alias is None:
            raise NotFoundError(f"model {branch!r} has no champion to answer: known branches are "
                                f"{', '.join(known) or 'none (run `selftune init`)'}")
        return alias.generation_id

    def get(self, branch: str) -> Champion:
        """The branch's current champion, loading it first if the alias moved (blocking: call in a thread)."""
        wanted = self.champion_id(branch)
        current = self._loaded.get(branch)
        if current is not None and current.generation_id == wanted:
            return current
        with self._branch_lock(branch):
            current = self._loaded.get(branch)
            if current is not None and current.generation_id == wanted:
                return current
            return self._load(branch, wanted)

    def current(self, branch: str) -> Champion | None:
        """What is loaded for the branch now (it may lag a promotion by a refresh); never loads."""
        return self._loaded.get(branch)

    def loaded(self) -> dict[str, int]:
        """Branch -> generation id of every loaded champion."""
        return {branch: champion.generation_id for branch, champion in self._loaded.items()}

    def refresh(self) -> list[str]:
        """Reload every loaded branch whose alias moved; returns the branches reloaded. Errors are logged:
        the old champion keeps serving until the new one loads."""
        reloaded = []
        for branch, champion in list(self._loaded.items()):
            try:
                if self.champion_id(branch) != champion.generation_id:
                    self.get(branch)
                    reloaded.append(branch)
            except Exception:  # noqa: BLE001 - a failed load must not stop the service
                log.exception("could not load the new champion of branch %s; generation %s keeps serving",
                              branch, champion.generation_id)
        return reloaded

    def _branch_lock(self, branch: str) -> threading.Lock:
        with self._guard:
            return self._load_locks.setdefault(branch, threading.Lock())

    def _load(self, branch: str, generation_id: int) -> Champion:
        directory = self.context.artifacts.path(generation_id)  # refuses a directory that does not verify
        log.info("loading generation %s as the champion of branch %s from %s", generation_id, branch, directory)
        if self.threads:
            import torch  # torch: only where a model is served

            torch.set_num_threads(self.threads)
        champion = Champion(branch, generation_id, directory)
        self._loaded[branch] = champion
        if self.metrics is not None:
            self.metrics.champion.labels(branch).set(generation_id)
            self.metrics.champion_load_seconds.labels(branch).set(champion.load_seconds)
        log.info("generation %s serves branch %s (loaded in %.1f s)", generation_id, branch, champion.load_seconds)
        return champion


def clamp_temperature(value: float) -> float:
    """OpenAI's temperature as a decoding choice: (nearly) 0 means greedy."""
    return 0.0 if not math.isfinite(value) or value < 1e-5 else value
