"""Plain-data views of the state for the CLI and the API (``--json`` prints exactly these)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from selftune.policies.branches import overrides
from selftune.policies.errors import NotFoundError
from selftune.policies.records import CHAMPION, Cycle, Feedback, Interaction
from selftune.storage.contracts import UnitOfWork

from selftune.daemon.context import Context
from selftune.daemon.cycle.workdir import GATE_RESULT, PROGRESS_FILE, cycle_dir, read_result


CHAT_ID_PREFIX = "chatcmpl-"
"""Chat completions are logged under ``chatcmpl-<hex>`` external ids; feedback takes those ids too."""


def resolve_interaction(tx: UnitOfWork, reference: str) -> int:
    """An interaction id, or a chat completion id (the external id its exchange was logged under)."""
    if reference.isascii() and reference.isdigit() and int(reference) < 2**63:  # ids are 64-bit in the database
        interaction_id = int(reference)
        tx.interactions.get(interaction_id)
        return interaction_id
    if reference.startswith(CHAT_ID_PREFIX):
        for branch in tx.branches.list():
            found = tx.interactions.find_by_external_id(branch.name, reference)
            if found is not None:
                return found.id
    raise NotFoundError(f"interaction {reference[:80]!r} does not exist: use the id that POST /v1/interactions "
                        "or POST /v1/chat/completions returned")


def generations_view(context: Context) -> list[dict[str, Any]]:
    """Every generation as ``{"id", "parent", "branch", "status", "params", "path", "aliases"}``."""
    with context.store.transaction() as tx:
        generations = tx.generations.list()
        aliases = tx.aliases.list()
    branch_of = {g.id: g.branch for g in generations}
    names: dict[int, list[str]] = defaultdict(list)
    for alias in aliases:  # an alias of another branch (a fork's starting point) names that branch
        own = alias.branch == branch_of.get(alias.generation_id)
        names[alias.generation_id].append(alias.name if own else f"{alias.branch}:{alias.name}")
    return [{"id": g.id, "parent": g.parent_id, "branch": g.branch, "status": g.status, "params": g.params,
             "path": g.path, "aliases": sorted(names[g.id])} for g in generations]


def branches_view(context: Context) -> list[dict[str, Any]]:
    """Every branch as ``{"name", "root", "domains", "specialist", "champion", "settings", "stored"}``.

    ``settings`` are those that differ from the global configuration, each ``{"key", "value", "global",
    "source"}`` (source: "specialist default", "configuration" for its [branches.NAME] table, or "branch
    set"); ``stored`` is what ``selftune branch set`` stored with it."""
    with context.store.transaction() as tx:
        branches = tx.branches.list()
        champions = {a.branch: a.generation_id for a in tx.aliases.list() if a.name == CHAMPION}
    return [{"name": b.name, "root": b.root_generation_id, "domains": list(b.domains), "specialist": b.is_specialist,
             "champion": champions.get(b.name),
             "settings": [{"key": o.key, "value": o.value, "global": o.global_value, "source": o.source}
                          for o in overrides(context.config, b.name, b.domains, b.settings)],
             "stored": dict(b.settings)}
            for b in branches]


def status_view(context: Context) -> dict[str, Any]:
    with context.store.transaction() as tx:
        counts = tx.interactions.count_by_branch_domain()
        aliases = tx.aliases.list()
    return {
        "state": str(context.state),
        "interactions": [{"branch": b, "domain": d, "count": n} for b, d, n in counts],
        "total_interactions": sum(n for _, _, n in counts),
        "generations": generations_view(context),
        "aliases": [{"branch": a.branch, "name": a.name, "generation": a.generation_id} for a in aliases],
    }


def cycle_view(context: Context, cycle_id: int) -> dict[str, Any]:
    """A cycle as ``{"cycle", "branch", "generation", "status", "state", "gates", "error", "steps", "progress"}``.

    ``status`` is the outcome ("promoted", "candidate", "rejected", "skipped", "failed", "cancelled")
    or "running"; ``gates`` are ``{"name", "passed", "value", "threshold", "margin", "reason"}``.
    """
    with context.store.transaction() as tx:
        cycle = tx.cycles.get(cycle_id)
        events = tx.cycles.events(cycle_id)
    directory = cycle_dir(context, cycle_id)
    verdict = read_result(directory, GATE_RESULT)
    gates: list[dict[str, Any]] = verdict["gates"] if verdict else []
    for event in events:  # a candidate refused before the gates (e.g. non-finite weights) records its gate here
        gates = gates or event.detail.get("gates", [])
    return {
        **cycle_summary(cycle),
        "gates": gates,
        "steps": [{"step": e.step, "outcome": e.outcome, "started_at": e.started_at.isoformat(),
                   "finished_at": e.finished_at.isoformat() if e.finished_at else None, "detail": e.detail}
                  for e in events],
        "progress": read_result(directory, PROGRESS_FILE) if cycle.outcome is None else None,
    }


def cycle_summary(cycle: Cycle) -> dict[str, Any]:
    """A cycle as ``{"cycle", "branch", "parent", "generation", "status", "state", "error", "created_at",
    "finished_at"}`` (``status`` as in ``cycle_view``): a row of ``GET /v1/cycles``."""
    return {"cycle": cycle.id, "branch": cycle.branch, "parent": cycle.parent_generation_id,
            "generation": cycle.generation_id, "status": cycle.outcome or "running", "state": cycle.state,
            "error": cycle.error, "created_at": _time(cycle.created_at), "finished_at": _time(cycle.finished_at)}


# -- records as JSON-ready dicts (the HTTP API answers with these) ---------------------------------------


def _time(value: Any) -> str | None:
    return None if value is None else value.isoformat()


def feedback_view(item: Feedback) -> dict[str, Any]:
    fields = ("thumbs_up", "score", "corrected_response", "chosen", "rejected", "comment")
    return {"id": item.id, "interaction_id": item.interaction_id, "kind": item.kind,
            "created_at": _time(item.created_at), **{f: getattr(item, f) for f in fields if getattr(item, f) is not None}}


def interaction_view(item: Interaction, feedback: list[Feedback] | None = None) -> dict[str, Any]:
    return {"id": item.id, "external_id": item.external_id, "branch": item.branch, "domain": item.domain,
            "tags": list(item.tags), "messages": [m.as_dict() for m in item.messages],
            "created_at": _time(item.created_at), "source": item.source, "metadata": item.metadata,
            "feedback": [feedback_view(f) for f in feedback or []]}


def generation_detail(context: Context, generation_id: int) -> dict[str, Any]:
    """One generation as in ``generations_view``, plus its metrics, creation time and cycle."""
    with context.store.transaction() as tx:
        generation = tx.generations.get(generation_id)
    row = next(r for r in generations_view(context) if r["id"] == generation_id)
    return {**row, "cycle": generation.cycle_id, "created_at": _time(generation.created_at),
            "metrics": generation.metrics}
