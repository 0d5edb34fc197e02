"""Serving generations: each branch's champion, and generations pinned by name, loaded on demand.

Every request names a model (``service.models`` resolves the name: a branch, an alias, a generation
id, or "auto"); the pool reads the alias (one indexed query) and, if it moved since the model was
loaded, loads the new generation first. So a newly promoted champion answers the very next request,
without a restart; ``refresh`` does the same ahead of time from the service's housekeeping loop, so
that request rarely pays for the load. A request that is already generating keeps the model it
started with until it finishes. Memory stays bounded: one champion per branch asked for, and at most
``max_pinned`` other generations, the least recently used unloaded first.

Generation is blocking torch work: callers run it in a worker thread. One lock per loaded model
serialises generation (on a small CPU, concurrent generate() calls only share the same cores).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from selftune.learners.chat import end_token_ids, generation_prompt_ids, pad_id  # torch-free
from selftune.policies.errors import InvalidRecordError
from selftune.policies.records import CHAMPION
from selftune.policies.selection import CLIENT_DISCONNECTED

from selftune.daemon.context import Context
from selftune.daemon.service.metrics import Metrics
from selftune.daemon.service.models import Models, Router, Target
from selftune.daemon.service.sampling import SamplingDefaults, SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenLogprob:
    """One token and its log-probability under the model (its raw distribution: before temperature or top-p)."""

    token: str
    logprob: float
    bytes: bytes
    top: tuple[TokenLogprob, ...] = ()
    """The most likely tokens at this position, most likely first."""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    """"stop" (end of turn or a stop string), "length" (max_new_tokens reached), or ``CLIENT_DISCONNECTED``."""
    prompt_tokens: int
    completion_tokens: int
    generation_id: int
    seconds: float
    """Spent generating here (a draft's tokens were generated, and timed, while routing)."""
    logprobs: tuple[TokenLogprob, ...] | None = None
    """The answer's tokens with their log-probabilities, when ``SamplingParams.logprobs`` asked for them."""


@dataclass(frozen=True)
class Draft:
    """An answer's first tokens, generated greedily before the answer (``cascade.first_tokens``: the router's
    deferral check), with what the answer needs to continue from them instead of generating them again."""

    prompt_ids: tuple[int, ...]
    tokens: tuple[int, ...]
    logits: tuple[Any, ...]
    """Each token's raw logits, ``[1, vocab]``."""
    cache: Mapping[str, Any]
    """The model's KV cache after them, keyed as ``generate`` takes it back; one continuation consumes it."""
    generation_id: int | None = None
    """The generation that generated them: only it continues them."""

    @property
    def confidence(self) -> float:
        """Mean log-probability of the tokens: higher is surer (what deferral thresholds are calibrated on)."""
        import torch  # only where a model answers

        chosen = [float(torch.log_softmax(step[0].float(), -1)[token]) for step, token in zip(self.logits, self.tokens)]
        return sum(chosen) / len(chosen) if chosen else -math.inf


class LoadedGeneration:
    """One generation loaded for serving (a branch's champion, or a generation pinned by name)."""

    def __init__(self, generation_id: int, directory: Path) -> None:
        from selftune.learners.evaluate import load_model  # torch: only where a model is served

        started = time.perf_counter()
        self.generation_id = generation_id
        self.directory = directory
        self.model, self.tokenizer = load_model(directory)
        self.lock = threading.Lock()
        self.load_seconds = time.perf_counter() - started
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self._stop_ids = end_token_ids(self.model, self.tokenizer)
        self.sampling_defaults = SamplingDefaults.read(directory)

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
                 cancelled: threading.Event | None = None, draft: Draft | None = None) -> Completion:
        """Generate an answer (blocking). ``on_text`` receives the answer's text piece by piece as it grows;
        setting ``cancelled`` stops generation at the next token. ``params`` are filled in
        (``SamplingDefaults.fill``).

        A ``draft`` this generation made for this prompt (the router's deferral check) is the answer's start: its
        tokens, greedy, are handed on first, and the rest continues from its KV cache, sampled as ``params`` say
        (an end-of-turn token in the draft ends the answer there). Its tokens count once, within
        ``max_new_tokens``; stop strings apply to the whole answer. Any other draft is not used."""
        import torch  # torch and transformers: only where a model is served
        from transformers import StoppingCriteria, StoppingCriteriaList

        stream = _TextStream(self.tokenizer, params.stop, on_text)
        cancelled = cancelled or threading.Event()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                done = cancelled.is_set() or stream.stopped
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        if params.temperature is None or params.top_p is None or params.top_k is None:
            raise ValueError(f"sampling not filled in: {params} (SamplingDefaults.fill does it)")
        max_new = self.budget(len(prompt_ids), params.max_new_tokens)
        sampling = params.temperature > 0
        options: dict[str, Any] = {"do_sample": sampling}
        if sampling:
            options.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        if draft is not None and (draft.generation_id, draft.prompt_ids) != (self.generation_id, tuple(prompt_ids)):
            draft = None  # another generation's or another prompt's
        prefix = list(draft.tokens[:max_new]) if draft is not None else []
        logits = list(draft.logits[:len(prefix)]) if draft is not None else []
        stream.feed(prefix)
        ended = len(prefix) == max_new or (bool(prefix) and prefix[-1] in self._stop_ids)
        new_tokens, seconds, wants_logprobs = prefix, 0.0, params.logprobs is not None
        if not (ended or stream.stopped):
            ids = torch.tensor([prompt_ids + prefix])
            cache = draft.cache if draft is not None and prefix else {}
            with self.lock, torch.inference_mode():
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                started = time.perf_counter()
                output = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new - len(prefix),
                    eos_token_id=self._stop_ids or None, pad_token_id=pad_id(self.tokenizer), streamer=stream,
                    stopping_criteria=StoppingCriteriaList([_Stop()]), return_dict_in_generate=True,
                    output_logits=wants_logprobs, **options, **cache)
                seconds = time.perf_counter() - started
            new_tokens = prefix + output.sequences[0, ids.shape[1]:].tolist()
            logits += output.logits or ()
        stream.finish()
        ended_by_model = bool(new_tokens) and new_tokens[-1] in self._stop_ids
        finish = "stop" if stream.stopped or ended_by_model or len(new_tokens) < max_new else "length"
        cut = stream.text if stream.stopped else None
        logprobs = self._logprobs(new_tokens, logits, params.logprobs, cut) if wants_logprobs else None
        return Completion(stream.text, finish, len(prompt_ids), len(new_tokens), self.generation_id, seconds, logprobs)

    def _logprobs(self, new_tokens: list[int], logits: Sequence[Any], top: int,
                  cut: str | None) -> tuple[TokenLogprob, ...]:
        """The log-probabilities of the answer's tokens, each with its ``top`` most likely alternatives. Special
        tokens (end of turn) are markup, not answer; where a stop string ``cut`` the answer to this text, the
        tokens after it are not answer either."""
        from selftune.learners.evaluate import token_bytes  # torch: only where a model is served

        special = {*self._stop_ids, *self.tokenizer.all_special_ids}
        kept: list[int] = []
        for k, token in enumerate(new_tokens):
            if cut is not None and len(self.tokenizer.decode(new_tokens[:k], skip_special_tokens=True).lstrip()) \
                    >= len(cut):
                break
            if token not in special:
                kept.append(k)
        if not kept:
            return ()
        steps = [logits[k][0].float().log_softmax(-1) for k in kept]
        alternatives = [step.topk(top) if top else None for step in steps]

        def tokens(ids: list[int], values: list[float]) -> list[TokenLogprob]:
            pieces = token_bytes(self.tokenizer, ids)
            return [TokenLogprob(self.tokenizer.decode([i]), v, b) for i, v, b in zip(ids, values, pieces)]

        chosen = tokens([new_tokens[k] for k in kept], [float(step[new_tokens[k]]) for k, step in zip(kept, steps)])
        return tuple(replace(token, top=tuple(tokens(best.indices.tolist(), best.values.tolist())) if best else ())
                     for token, best in zip(chosen, alternatives))


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
        self.feed(int(t) for t in value.reshape(-1).tolist())

    def feed(self, tokens: Iterable[int]) -> None:
        """More of the answer's tokens (``put`` is how generate() hands them over)."""
        if not self.stopped:
            self.tokens.extend(tokens)
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
    """The loaded generations: each branch's champion once a request asked for it (and the default
    branch's, preloaded), and other generations pinned by name, loaded on demand: at most
    ``max_pinned`` of those, the least recently used unloaded first. A champion the alias moved away
    from becomes such an other generation (a rollback or a pin to it is served at once, while it stays).
    ``models`` resolves the names; its ``router`` is where the cascade's router is wired in."""

    def __init__(self, context: Context, metrics: Metrics | None = None, threads: int = 0,
                 router: Router | None = None, max_pinned: int | None = None) -> None:
        self.context = context
        self.metrics = metrics
        self.threads = threads
        self.models = Models(context, router, metrics)
        self.max_pinned = context.config.server.max_pinned_generations if max_pinned is None else max_pinned
        self._loaded: OrderedDict[int, LoadedGeneration] = OrderedDict()
        """Generation id -> its loaded model, least recently used first."""
        self._champions: dict[str, int] = {}
        """Branch -> the generation last served as its champion."""
        self._load_locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()

    def serve(self, name: str, messages: Sequence[dict[str, str]] = ()) -> tuple[Target, LoadedGeneration]:
        """The generation that answers the model ``name`` (``"auto"`` routes ``messages``), loaded
        (blocking: call in a thread). ``ModelNotFoundError`` names the bad part of a name and what exists."""
        target = self.models.resolve(name, messages)
        return target, self.load(target)

    def get(self, branch: str) -> LoadedGeneration:
        """The branch's current champion, loading it first if the alias moved (blocking: call in a thread)."""
        return self.load(self.models.pin(branch))

    def load(self, target: Target) -> LoadedGeneration:
        """The target's generation, from memory or loaded now; a champion is remembered as its branch's
        (once it is loaded: until then the one before serves ``current``)."""
        generation_id = target.generation_id
        with self._guard:
            found = self._touch(generation_id)
        if found is None:
            with self._generation_lock(generation_id):
                with self._guard:
                    found = self._touch(generation_id)
                if found is None:
                    found = self._load(generation_id)
                    if target.alias == CHAMPION and self.metrics is not None:
                        self.metrics.champion_load_seconds.labels(target.branch).set(found.load_seconds)
        with self._guard:  # one step: a generation just loaded is never evicted before it counts as a champion
            self._loaded[generation_id] = found
            self._loaded.move_to_end(generation_id)
            before = self._champions.get(target.branch)
            if target.alias == CHAMPION:
                self._champions[target.branch] = generation_id
            self._evict()
        if target.alias == CHAMPION and before != generation_id:
            log.info("generation %s serves as the champion of branch %s (before: %s)", generation_id,
                     target.branch, before)
            if self.metrics is not None:
                self.metrics.set_champion(target.branch, generation_id)
        return found

    def current(self, branch: str) -> LoadedGeneration | None:
        """The branch's champion if it is loaded (it may lag a promotion by a refresh); never loads."""
        with self._guard:
            generation_id = self._champions.get(branch)
            return None if generation_id is None else self._loaded.get(generation_id)

    def loaded(self) -> dict[str, int]:
        """Branch -> generation id of every loaded champion."""
        with self._guard:
            return {branch: g for branch, g in self._champions.items() if g in self._loaded}

    def pinned(self) -> list[int]:
        """Generations loaded besides the champions, least recently used first."""
        with self._guard:
            return self._others()

    def refresh(self) -> list[str]:
        """Load the new champion of every branch whose champion is loaded and whose alias moved; returns the
        branches reloaded. Errors are logged: the old champion keeps serving until the new one loads."""
        reloaded = []
        for branch, generation_id in self.loaded().items():
            try:
                target = self.models.pin(branch)
                if target.generation_id != generation_id:
                    self.load(target)
                    reloaded.append(branch)
            except Exception:  # noqa: BLE001 - a failed load must not stop the service
                log.exception("could not load the new champion of branch %s; generation %s keeps serving",
                              branch, generation_id)
        return reloaded

    def _touch(self, generation_id: int) -> LoadedGeneration | None:
        """Under the guard: the loaded generation, now the most recently used."""
        found = self._loaded.get(generation_id)
        if found is not None:
            self._loaded.move_to_end(generation_id)
        return found

    def _others(self) -> list[int]:
        """Under the guard: loaded generations that are no branch's champion, least recently used first."""
        champions = set(self._champions.values())
        return [g for g in self._loaded if g not in champions]

    def _evict(self) -> None:
        """Under the guard: unload the least recently used others beyond ``max_pinned`` (a request still
        generating with one keeps it until it finishes)."""
        others = self._others()
        for generation_id in others[: max(0, len(others) - self.max_pinned)]:
            del self._loaded[generation_id]
            log.info("generation %s unloaded (least recently used beyond %s pinned)", generation_id, self.max_pinned)
            if self.metrics is not None:
                self.metrics.evictions.inc()

    def _generation_lock(self, generation_id: int) -> threading.Lock:
        with self._guard:
            return self._load_locks.setdefault(generation_id, threading.Lock())

    def _load(self, generation_id: int) -> LoadedGeneration:
        directory = self.context.artifacts.path(generation_id)  # refuses a directory that does not verify
        log.info("loading generation %s from %s", generation_id, directory)
        if self.threads:
            import torch  # torch: only where a model is served

            torch.set_num_threads(self.threads)
        loaded = LoadedGeneration(generation_id, directory)
        log.info("generation %s loaded in %.1f s", generation_id, loaded.load_seconds)
        return loaded
