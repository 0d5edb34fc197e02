"""The lineage page: per branch, its generations as a tree, with status, aliases, key metrics and report links."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from selftune.daemon.context import Context
from selftune.daemon.reports.model import REPORT_URL, summary_rows
from selftune.daemon.reports.render import templates
from selftune.daemon.views import generations_view


def render_lineage_html(rows: list[dict[str, Any]], report_url: str = REPORT_URL) -> str:
    """The lineage page: per branch, its generations as a tree, with status, aliases, key metrics and links.

    ``rows`` are ``views.generations_view`` dicts, optionally with ``"metrics"`` and ``"created_at"``
    (``lineage_rows`` adds them); ``report_url`` has ``{id}`` where the generation id goes.
    """
    return templates().get_template("lineage.html.j2").render(
        branches=lineage_branches(rows), total=len(rows), report_link=lambda i: report_url.format(id=i))


def lineage_rows(context: Context) -> list[dict[str, Any]]:
    """``generations_view`` rows with each generation's key metrics (parent -> child) and creation time."""
    rows = generations_view(context)
    with context.store.transaction() as tx:
        generations = {g.id: g for g in tx.generations.list()}
    for row in rows:
        generation = generations.get(row["id"])
        row["created_at"] = generation.created_at.isoformat() if generation else None
        row["metrics"] = key_metrics(generation.metrics if generation else {})
    return rows


def key_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A generation's headline numbers for the lineage page (empty for the foundation, which has no suites);
    a loss with its ``unit`` (bits/byte, or nats/token for a generation recorded before losses were per byte)."""
    candidate, parent = metrics.get("candidate") or {}, metrics.get("parent") or {}
    if not candidate:
        return {}
    return {row["key"]: {"value": row["child"], "relative": row["relative"], "improved": row["improved"],
                         **({"unit": row["unit"]} if row["unit"] else {})}
            for row in summary_rows(candidate, parent) if row["child"] is not None}


def lineage_branches(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows grouped by branch, each branch a forest of ``{"row", "children"}`` (a fork's first generations
    hang under the generation of the other branch they started from, named in ``forked_from``)."""
    by_id = {r["id"]: r for r in rows}
    branches: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: r["id"]):
        branches.setdefault(row["branch"], []).append(row)
    out = []
    for name, members in branches.items():
        ids = {r["id"] for r in members}
        roots = [r for r in members if r["parent"] not in ids]
        forked = sorted({r["parent"] for r in roots if r["parent"] is not None})
        out.append({"name": name, "count": len(members), "trees": [_subtree(r, members) for r in roots],
                    "forked_from": [{"id": i, "branch": by_id[i]["branch"] if i in by_id else None} for i in forked]})
    return out


def _subtree(row: dict[str, Any], members: list[dict[str, Any]]) -> dict[str, Any]:
    return {"row": row, "children": [_subtree(r, members) for r in members if r["parent"] == row["id"]]}
