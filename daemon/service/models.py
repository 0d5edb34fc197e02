"""Model names: what a request's ``model`` (or ``selftune export NAME``) says, resolved to the generation that answers.

The names, MLflow-style aliases over the lineage:

- ``"<branch>"``: the branch's champion (``"<branch>@champion"`` says the same explicitly);
- ``"<branch>@challenger"``: the candidate that passed its gates and awaits approval, while there is one;
- ``"<branch>@<generation id>"``: that generation, pinned: one of the branch's own, or the one it forked at;
- ``"auto"``: a ``Router`` chooses the branch per request; with none configured, the default branch's
  champion answers, recorded as not routed (reason ``"no router"``).

A name that names nothing raises ``ModelNotFoundError``, naming the bad part and listing what exists.
``Models.entries`` lists every name that works (``GET /v1/models``): a failed generation, or one whose
directory is gone, has no model to answer with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from selftune.policies.config import BRANCH_NAME
from selftune.policies.errors import NotFoundError
from selftune.policies.records import ALIASES, AUTO_MODEL, CHAMPION, Branch, Generation

if TYPE_CHECKING:  # the CLI's export imports this module: it stays light
    from selftune.storage.contracts import UnitOfWork

    from selftune.daemon.context import Context
    from selftune.daemon.service.metrics import Metrics
    from selftune.daemon.service.pool import Draft

log = logging.getLogger(__name__)
AUTO = AUTO_MODEL
"""The name that lets the router choose."""
PINNED, ROUTED, DEFERRED = "pinned", "routed", "deferred"
"""How the answering generation was chosen: named by the request, chosen by the router, or passed up to it."""
NO_ROUTER = "no router"
CANNOT_ANSWER = ("failed",)
"""Generation statuses without a model to answer with."""
MAX_ID_DIGITS = 9
"""Longer numbers after '@' name no generation (and never reach the database as an overflowing integer)."""


class ModelNotFoundError(NotFoundError):
    """A model name that names no generation that can answer; ``known`` lists the names that do (at the
    level where the name went wrong: the branches, or the branch's own names)."""

    def __init__(self, name: str, problem: str, known: Sequence[str]) -> None:
        self.name = name
        self.problem = problem
        self.known = tuple(known)
        super().__init__(f"model {name!r}: {problem}; the names that work: {', '.join(self.known) or 'none'}")


class RouteDecision(Protocol):
    """What a router decided for one request. Any object with these attributes fits (a frozen dataclass of
    ``policies`` too); ``Decision`` is the one this module makes."""

    @property
    def branch(self) -> str:
        """The branch that answers."""
        ...

    @property
    def generation_id(self) -> int | None:
        """A generation of that branch to answer with; None: its champion as the alias names it now."""
        ...

    @property
    def routed(self) -> bool:
        """False when nothing was chosen (no router, or it failed): the fallback answers."""
        ...

    @property
    def deferred_from(self) -> Sequence[str]:
        """Models (``"branch@id"``) chosen first that passed the request up their lineage, in order."""
        ...

    @property
    def reason(self) -> str:
        """Why, in a few words (logged with the exchange)."""
        ...

    @property
    def details(self) -> Mapping[str, Any]:
        """What the router measured (similarities, confidence), JSON-ready: logged with the exchange."""
        ...

    @property
    def draft(self) -> Draft | None:
        """The answer's first tokens, if the router generated them with the model that answers (the deferral
        check): the answer continues from them instead of generating them again."""
        ...


class Router(Protocol):
    """Chooses who answers a ``"model": "auto"`` request. ``choose`` runs in a worker thread before any byte
    of the response is sent (so it may generate first tokens to decide a deferral, and hand them on as the
    decision's ``draft``); its time is observed as ``selftune_routing_duration_seconds``. If it raises, or names
    a model that does not exist, the default branch's champion answers and the decision says why."""

    def choose(self, messages: Sequence[Mapping[str, str]]) -> RouteDecision: ...


@dataclass(frozen=True)
class Decision:
    """A ``RouteDecision``: the fallback's, or a router's own."""

    branch: str
    generation_id: int | None = None
    routed: bool = True
    deferred_from: tuple[str, ...] = ()
    reason: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    draft: Draft | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Target:
    """A model name resolved: the generation that answers, on which branch, and how it was chosen."""

    requested: str
    """The name as the request said it."""
    branch: str
    """The branch that answers: its exchange is logged there."""
    generation_id: int
    path: Path
    alias: str | None
    """``"champion"`` or ``"challenger"`` when the name went through an alias; None when it pinned an id."""
    route: str = PINNED
    """``PINNED``, ``ROUTED`` or ``DEFERRED``."""
    decision: RouteDecision | None = None
    """The router's decision, for ``"auto"``."""
    routing_seconds: float = 0.0

    @property
    def name(self) -> str:
        """The concrete name of the generation that answers: ``"branch@id"``."""
        return f"{self.branch}@{self.generation_id}"

    def record(self) -> dict[str, Any]:
        """The routing record logged with the exchange, as ``{"route": <this>}`` in its metadata."""
        decision = None
        if self.decision is not None:
            decision = {"branch": self.decision.branch, "generation": self.decision.generation_id,
                        "routed": self.decision.routed, "deferred_from": list(self.decision.deferred_from),
                        "reason": self.decision.reason, "details": dict(self.decision.details),
                        "seconds": round(self.routing_seconds, 6)}
        return {"requested": self.requested, "model": self.name, "branch": self.branch,
                "generation": self.generation_id, "alias": self.alias, "kind": self.route, "decision": decision}


@dataclass(frozen=True)
class ModelEntry:
    """One name that works, and what it answers with now."""

    name: str
    branch: str | None
    generation_id: int | None
    """None for ``"auto"``: it depends on the request."""
    alias: str | None
    status: str | None
    created: datetime | None


class Models:
    """Resolves model names against the lineage in the database (one read transaction each), routing
    ``"auto"`` through ``router``: the seam where the cascade's router is wired in
    (``pool.models.router = ...``)."""

    def __init__(self, context: Context, router: Router | None = None, metrics: Metrics | None = None) -> None:
        self.context = context
        self.router = router
        self.metrics = metrics

    def resolve(self, name: str, messages: Sequence[Mapping[str, str]] = ()) -> Target:
        """The generation that answers ``name`` (``"auto"`` asks the router about ``messages``). Blocking:
        database reads, and the router's work; call it in a thread."""
        if name == AUTO:
            return self._route(messages)
        return self.pin(name)

    def pin(self, name: str) -> Target:
        """A name other than ``"auto"`` resolved (export takes these): ``ModelNotFoundError`` if it names nothing."""
        branch, _, selector = name.partition("@")
        with self.context.store.transaction() as tx:
            found = tx.branches.find(branch) if BRANCH_NAME.fullmatch(branch) and name != AUTO else None
            if found is None:
                problem = "it chooses per request: name a branch here" if name == AUTO else f"no branch {branch!r}"
                raise ModelNotFoundError(name, problem, self._branch_names(tx) + ([AUTO] if name != AUTO else []))
            if "@" not in name or selector in ALIASES:
                return self._through_alias(tx, name, found, selector or CHAMPION)
            return self._pinned_id(tx, name, found, selector)

    def generation(self, generation_id: int) -> Target:
        """A generation by id alone, on its own branch (``selftune export 3``)."""
        with self.context.store.transaction() as tx:
            generation = tx.generations.find(generation_id) if 0 <= generation_id < 10**MAX_ID_DIGITS else None
            if generation is None or generation.status in CANNOT_ANSWER:
                known = [str(g.id) for g in tx.generations.list() if g.status not in CANNOT_ANSWER]
                problem = "it failed and has no model" if generation else "no such generation"
                raise ModelNotFoundError(str(generation_id), problem, known)
            return Target(str(generation_id), generation.branch, generation.id, Path(generation.path), None)

    def entries(self) -> list[ModelEntry]:
        """Every name that works now: each branch with a champion, its aliases, each of its generations that
        can answer, and ``"auto"``; the default branch first."""
        on_disk = set(self.context.artifacts.ids())
        with self.context.store.transaction() as tx:
            out = [entry for b in self._branches(tx) for entry in self._branch_entries(tx, b, on_disk)]
        default = next((e for e in out if e.name == self.context.config.ingest.default_branch), None)
        out.append(ModelEntry(AUTO, None, None, None, None, default.created if default else None))
        return out

    # -- "auto" ----------------------------------------------------------------------------------------------

    def _route(self, messages: Sequence[Mapping[str, str]]) -> Target:
        started = time.perf_counter()
        decision: RouteDecision
        if self.router is None:
            decision = self._fallback(NO_ROUTER)
        else:
            try:
                decision = self.router.choose(messages)
            except Exception as exc:  # noqa: BLE001 - a failing router must not fail the request
                log.exception("the router failed; the default branch's champion answers")
                decision = self._fallback(f"router failed: {type(exc).__name__}")
        seconds = time.perf_counter() - started
        try:
            target = self._decided(decision, seconds)
        except ModelNotFoundError as exc:
            log.error("the router chose a model that does not exist (%s); the default branch's champion answers", exc)
            target = self._decided(self._fallback(f"router chose an unknown model: {exc.problem}"), seconds)
        self._observe(target)
        return target

    def _fallback(self, reason: str) -> Decision:
        return Decision(self.context.config.ingest.default_branch, routed=False, reason=reason)

    def _decided(self, decision: RouteDecision, seconds: float) -> Target:
        named = decision.branch if decision.generation_id is None else f"{decision.branch}@{decision.generation_id}"
        pinned = self.pin(named)
        route = DEFERRED if decision.deferred_from else ROUTED
        return Target(AUTO, pinned.branch, pinned.generation_id, pinned.path, pinned.alias, route, decision, seconds)

    def _observe(self, target: Target) -> None:
        if self.metrics is None or target.decision is None:
            return
        self.metrics.routing_seconds.observe(target.routing_seconds)
        hops = [name.partition("@")[0] for name in target.decision.deferred_from] + [target.branch]
        for source, destination in zip(hops, hops[1:], strict=False):
            self.metrics.deferrals.labels(source, destination).inc()

    # -- pinned names ------------------------------------------------------------------------------------------

    def _through_alias(self, tx: UnitOfWork, name: str, branch: Branch, alias_name: str) -> Target:
        alias = tx.aliases.get(branch.name, alias_name)
        if alias is None:
            raise ModelNotFoundError(name, f"branch {branch.name!r} has no {alias_name} now",
                                     self._names(tx, branch))
        generation = tx.generations.get(alias.generation_id)
        return Target(name, branch.name, generation.id, Path(generation.path), alias_name)

    def _pinned_id(self, tx: UnitOfWork, name: str, branch: Branch, selector: str) -> Target:
        if not (selector.isascii() and selector.isdigit() and len(selector) <= MAX_ID_DIGITS):
            raise ModelNotFoundError(name, f"{selector!r} after '@' is neither an alias ({', '.join(ALIASES)}) "
                                           "nor a generation id", self._names(tx, branch))
        generation = tx.generations.find(int(selector))
        if generation is None or not _on_branch(generation, branch):
            elsewhere = f" (it is {generation.branch}@{generation.id})" if generation is not None else ""
            raise ModelNotFoundError(name, f"no generation {int(selector)} on branch {branch.name!r}{elsewhere}",
                                     self._names(tx, branch))
        if generation.status in CANNOT_ANSWER:
            raise ModelNotFoundError(name, f"generation {generation.id} {generation.status} and has no model",
                                     self._names(tx, branch))
        return Target(name, branch.name, generation.id, Path(generation.path), None)

    # -- what exists ----------------------------------------------------------------------------------------------

    def _branches(self, tx: UnitOfWork) -> list[Branch]:
        """Every branch, the default one first."""
        default = self.context.config.ingest.default_branch
        return sorted(tx.branches.list(), key=lambda b: (b.name != default, b.name))

    def _branch_names(self, tx: UnitOfWork) -> list[str]:
        champions = {a.branch for a in tx.aliases.list() if a.name == CHAMPION}
        return [b.name for b in self._branches(tx) if b.name in champions]

    def _names(self, tx: UnitOfWork, branch: Branch) -> list[str]:
        return [e.name for e in self._branch_entries(tx, branch, set(self.context.artifacts.ids()))]

    def _branch_entries(self, tx: UnitOfWork, branch: Branch, on_disk: set[int]) -> list[ModelEntry]:
        generations = {g.id: g for g in _branch_generations(tx, branch)
                       if g.status not in CANNOT_ANSWER and g.id in on_disk}
        aliases = {a.name: a.generation_id for a in tx.aliases.list(branch.name)}
        if aliases.get(CHAMPION) not in generations:
            return []  # a branch without a champion that can answer answers nothing

        def entry(name: str, generation: Generation, alias: str | None) -> ModelEntry:
            return ModelEntry(name, branch.name, generation.id, alias, generation.status, generation.created_at)

        champion = generations[aliases[CHAMPION]]
        out = [entry(branch.name, champion, CHAMPION)]
        out += [entry(f"{branch.name}@{alias}", generations[aliases[alias]], alias)
                for alias in ALIASES if aliases.get(alias) in generations]
        out += [entry(f"{branch.name}@{g.id}", g, None) for g in _by_id(generations.values())]
        return out


def _on_branch(generation: Generation, branch: Branch) -> bool:
    """A branch's generations: its own, and the one it forked at (its root)."""
    return generation.branch == branch.name or generation.id == branch.root_generation_id


def _branch_generations(tx: UnitOfWork, branch: Branch) -> list[Generation]:
    own = tx.generations.list(branch.name)
    root = branch.root_generation_id
    if root is not None and all(g.id != root for g in own):
        found = tx.generations.find(root)
        own = [found, *own] if found is not None else own
    return own


def _by_id(generations: Iterable[Generation]) -> list[Generation]:
    return sorted(generations, key=lambda g: g.id)
