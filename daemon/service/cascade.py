"""The cascade's router: ``"model": "auto"`` goes to the specialist whose scope the prompt is in, and a specialist
unsure of its answer passes it up its lineage.

``CascadeRouter`` is the ``models.Router`` the service wires in (``ServiceState.build``). Per request:

1. the last user message is embedded (``learners.embed.PromptEmbedder`` on generation 0, loaded on first use,
   each text cached by its hash) and scored against each specialist branch's routing index: the
   ``router.faiss`` / ``router.json`` its champion's cycle stored in the generation directory, with the
   threshold calibrated there (``cycle.routing``);
2. ``policies.routing.route`` picks the highest-scoring specialist at or above its own threshold. None in
   scope: the default branch answers, and the decision still counts as routed (``routed=True``, reason "no
   specialist in scope (closest: ...)"): the router looked and chose the generalist. Only when no specialist
   has an index at all is nothing chosen (``routed=False``, reason "no router": there is nothing to route with);
3. deferral, when the chosen champion's ``generation.json`` holds a calibrated deferral threshold (and
   ``routing.deferral`` is on): the specialist generates its first ``routing.deferral_tokens`` tokens greedily,
   and a mean log-probability below the threshold passes the request to its parent line (the branch of the
   generation it forked at), which may defer again, up to the generalist. The model that keeps the request
   answers on from its first tokens (the decision's ``draft``: ``pool.LoadedGeneration.generate`` continues
   from the check's KV cache), so the check costs no second generation; a model that defers wasted only them.

The specialists' champions are re-read (one read transaction) at most every ``server.champion_poll_seconds``,
so a promotion or rollback changes the routing within that time; ``refresh`` does it at once.
``details`` of each decision hold every score, the thresholds and, when asked, the confidence: logged with the
exchange. Routing off (``routing.enabled = false``, a reload applies it) sends ``auto`` to the default branch.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selftune.policies.records import CHAMPION, FOUNDATION_ID
from selftune.policies.routing import RoutingConfig, route, should_defer

from selftune.daemon.service.models import NO_ROUTER, Decision

if TYPE_CHECKING:
    from selftune.learners.embed import PromptEmbedder
    from selftune.learners.route_index import RouteIndex

    from selftune.daemon.context import Context
    from selftune.daemon.service.pool import ChampionPool, Draft

log = logging.getLogger(__name__)
ROUTING_DISABLED = "routing disabled"


def make_embedder(context: Context, routing: RoutingConfig, max_tokens: int | None = None) -> PromptEmbedder:
    """The prompt embedder ``[routing]`` describes: generation 0 ("foundation") or an encoder directory; texts cut
    to ``max_tokens`` (default ``routing.max_prompt_tokens``)."""
    from selftune.learners.embed import PromptEmbedder  # torch: only where prompts are embedded

    source = context.artifacts.path(FOUNDATION_ID) if routing.embedder == "foundation" else Path(routing.embedder)
    return PromptEmbedder(source, layers=None if routing.embed_layers == -1 else routing.embed_layers,
                          max_tokens=max_tokens or routing.max_prompt_tokens, threads=routing.threads,
                          cache_size=routing.cache_size)


def last_user_message(messages: Sequence[Mapping[str, str]]) -> str:
    """The text a request (or a logged row) is routed by: its last user message ('' if it has none)."""
    return next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")


def first_tokens(model: Any, tokenizer: Any, prompt_ids: list[int], tokens: int) -> Draft:
    """The first ``tokens`` tokens the model answers greedily (an end-of-turn token ends them early, and counts),
    with their logits and the KV cache after them: the deferral check, and the start of the answer when the
    model keeps the request."""
    import torch  # only where a model answers

    from selftune.learners.chat import end_token_ids, pad_id

    from selftune.daemon.service.pool import Draft

    ids = torch.tensor([prompt_ids], device=next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             do_sample=False, eos_token_id=end_token_ids(model, tokenizer) or None,
                             pad_token_id=pad_id(tokenizer), output_logits=True, return_dict_in_generate=True)
    cache = next((name for name in ("cache", "past_key_values") if name in out), None)  # transformers 5 renamed it
    return Draft(tuple(prompt_ids), tuple(out.sequences[0, len(prompt_ids):].tolist()), tuple(out.logits),
                 {cache: out[cache]} if cache else {})


def answer_confidence(model: Any, tokenizer: Any, prompt_ids: list[int], tokens: int) -> float:
    """Mean log-probability of the model's ``first_tokens``: higher is surer. The cycle calibrates the deferral
    threshold with this very function, so serving measures what calibration measured."""
    return first_tokens(model, tokenizer, prompt_ids, tokens).confidence


@dataclass(frozen=True)
class Specialist:
    """A specialist branch's champion as the router uses it."""

    branch: str
    generation_id: int
    index: RouteIndex | None
    """None: its champion has no routing index (not calibrated, or below ``routing.min_route_accuracy``)."""
    parent_branch: str | None
    """The line it defers to: the branch of the generation it forked at."""
    deferral_threshold: float | None
    """Its champion defers when its confidence is below this (``inf``: calibration found it should always defer;
    None: not calibrated, it never defers)."""


class CascadeRouter:
    """Routes ``"model": "auto"`` (see the module's docstring). ``pool``, when given, lets a chosen specialist
    measure its confidence on its first tokens (deferral); without it there is no deferral."""

    def __init__(self, context: Context, pool: ChampionPool | None = None) -> None:
        self.context = context
        self.pool = pool
        self._specialists: dict[str, Specialist] = {}
        self._embedder: PromptEmbedder | None = None
        self._checked_at = -math.inf
        self._lock = threading.Lock()

    # -- the decision ------------------------------------------------------------------------------------------

    def choose(self, messages: Sequence[Mapping[str, str]]) -> Decision:
        routing, default = self.context.config.routing, self.context.config.ingest.default_branch
        if not routing.enabled:
            return Decision(default, routed=False, reason=ROUTING_DISABLED)
        started = time.perf_counter()
        specialists = self.specialists()
        indexes = {s.branch: s.index for s in specialists.values() if s.index is not None}
        if not indexes:
            return Decision(default, routed=False, reason=NO_ROUTER,
                            details={"why": "no specialist's champion has a routing index"})
        vector = self.embedder().embed_one(last_user_message(messages))
        scores = {branch: index.score(vector) for branch, index in indexes.items()}
        thresholds = {branch: index.threshold for branch, index in indexes.items() if index.threshold is not None}
        chosen = route(scores, thresholds)
        details: dict[str, Any] = {"scores": _rounded(scores), "thresholds": _rounded(thresholds),
                                   "route_seconds": round(time.perf_counter() - started, 6)}
        branch, deferred, reason, draft = chosen.branch or default, [], chosen.reason, None
        if chosen.branch is not None and routing.deferral and self.pool is not None:
            branch, deferred, reason, draft = self._defer(chosen.branch, messages, specialists, routing, details,
                                                          reason)
        return Decision(branch, routed=True, deferred_from=tuple(deferred), reason=reason, details=details,
                        draft=draft)

    def _defer(self, branch: str, messages: Sequence[Mapping[str, str]], specialists: Mapping[str, Specialist],
               routing: RoutingConfig, details: dict[str, Any],
               reason: str) -> tuple[str, list[str], str, Draft | None]:
        """Walk up the lineage while the branch's champion is unsure of its first tokens; the first tokens of
        the one that keeps the request start its answer."""
        assert self.pool is not None
        started, deferred, confidences, draft = time.perf_counter(), [], {}, None
        default = self.context.config.ingest.default_branch
        hop = specialists.get(branch)
        while hop is not None and hop.deferral_threshold is not None and hop.branch not in confidences:
            loaded = self.pool.get(hop.branch)
            if loaded.generation_id != hop.generation_id:  # the champion moved since the threshold was read
                self.refresh()
                break
            prompt = loaded.prompt_ids([{"role": m["role"], "content": m["content"]} for m in messages])
            with loaded.lock:
                checked = first_tokens(loaded.model, loaded.tokenizer, prompt, routing.deferral_tokens)
            confidence = checked.confidence
            confidences[hop.branch] = round(confidence, 4)
            if not should_defer(confidence, hop.deferral_threshold):
                draft = replace(checked, generation_id=loaded.generation_id)
                break
            deferred.append(f"{hop.branch}@{hop.generation_id}")
            reason = (f"{reason}; {hop.branch} deferred (confidence {confidence:.3f} < its threshold "
                      f"{hop.deferral_threshold:.3f})")
            branch = hop.parent_branch or default
            hop = specialists.get(branch)
        details.update(confidence=confidences, deferral_seconds=round(time.perf_counter() - started, 6))
        return branch, deferred, reason, draft

    # -- what it routes with -------------------------------------------------------------------------------------

    def embedder(self) -> PromptEmbedder:
        """The prompt embedder, loaded on first use."""
        with self._lock:
            if self._embedder is None:
                self._embedder = make_embedder(self.context, self.context.config.routing)
                log.info("routing embedder loaded: %s", self._embedder.settings())
            return self._embedder

    def warm(self) -> None:
        """Re-read the specialists now and, if routing is on and one has an index, load the embedder: the
        service's housekeeping calls it, so that requests rarely pay for either."""
        specialists = self.refresh()
        if self.context.config.routing.enabled and any(s.index is not None for s in specialists.values()):
            self.embedder()

    def specialists(self) -> dict[str, Specialist]:
        """Each specialist branch with a champion, re-read when ``server.champion_poll_seconds`` have passed."""
        if time.monotonic() - self._checked_at >= self.context.config.server.champion_poll_seconds:
            self.refresh()
        return self._specialists

    def refresh(self) -> dict[str, Specialist]:
        """Re-read the specialists' champions now; an index is loaded again only when its champion moved."""
        with self.context.store.transaction() as tx:
            champions = {a.branch: a.generation_id for a in tx.aliases.list() if a.name == CHAMPION}
            lines = {}
            for b in tx.branches.list():
                if b.is_specialist and b.name in champions:
                    root = tx.generations.find(b.root_generation_id) if b.root_generation_id is not None else None
                    lines[b.name] = (champions[b.name], root.branch if root is not None else None)
        fresh = {}
        for branch, (generation_id, parent_branch) in lines.items():
            known = self._specialists.get(branch)
            if known is not None and known.generation_id == generation_id:
                fresh[branch] = known
                continue
            try:
                fresh[branch] = self._load(branch, generation_id, parent_branch)
            except Exception:  # noqa: BLE001 - one broken index must not stop routing to the others
                log.exception("the routing index of %s@%s could not be loaded; %s is not routed to",
                              branch, generation_id, branch)
                fresh[branch] = Specialist(branch, generation_id, None, parent_branch, None)
        self._specialists, self._checked_at = fresh, time.monotonic()
        return fresh

    def _load(self, branch: str, generation_id: int, parent_branch: str | None) -> Specialist:
        from selftune.learners.route_index import RouteIndex  # faiss: only once a specialist has an index

        manifest = self.context.artifacts.verify(generation_id, deep=False)
        routing = manifest.get("routing") or {}
        if manifest.get("branch") != branch or not routing.get("enabled"):
            why = "it is where the branch forked" if manifest.get("branch") != branch else routing.get("reason")
            log.info("%s@%s has no routing index (%s): not routed to", branch, generation_id, why)
            return Specialist(branch, generation_id, None, parent_branch, None)
        index = RouteIndex.load(self.context.artifacts.path(generation_id))
        index.check_embedder(self.embedder().settings())
        deferral = routing.get("deferral") or {}
        threshold = None
        if deferral.get("enabled"):
            threshold = math.inf if deferral.get("defer_all") else deferral.get("threshold")
        log.info("routing to %s@%s: %s prompts, threshold %.3f, deferral threshold %s", branch, generation_id,
                 index.count, index.threshold if index.threshold is not None else math.nan, threshold)
        return Specialist(branch, generation_id, index, parent_branch, threshold)


def _rounded(values: Mapping[str, float]) -> dict[str, float | None]:
    """JSON-ready: 4 decimals, non-finite as None."""
    return {k: round(float(v), 4) if math.isfinite(v) else None for k, v in values.items()}
