"""Plain-data views of the state for the CLI and the API (``--json`` prints exactly these)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .context import Context


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

