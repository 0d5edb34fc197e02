"""A generation's reports, written into its directory before it is renamed into place; and the lineage page.

Per generation (rejected ones too): ``report.html`` (one self-contained page: CSS inline, plots as
inline PNG, no external URL), ``report.md`` (for a terminal), ``report.json`` (everything, for
programs), ``README.md`` (a Hugging Face model card) and ``plots/*.png``. Templates are jinja2 with
autoescaping, because prompts, answers and domain names are user data. Plots use matplotlib's Agg
canvas directly (no pyplot, no global backend), imported only when a report is written.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from selftune.policies.errors import InvalidRecordError, NotFoundError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from selftune.daemon.context import Context

REPORT_URL = "/v1/generations/{id}/report"
"""Where the HTTP API serves a generation's HTML report; the lineage page links there by default."""
CURVES = (("loss", "training loss"), ("ewc_penalty", "EWC penalty"), ("tokens_per_s", "throughput (tokens/s)"))
"""Training curves drawn, as (key in the learner's per-step records, title)."""
SUMMARY_METRICS = (
    ("new_data_loss", "new-data loss", "lower"),
    ("foundation_probe_loss", "foundation probe loss", "lower"),
    ("golden_pass_rate", "golden pass rate", "higher"),
    ("params", "parameters", "lower"),
    ("decode_tokens_per_s", "decode tokens/s", "higher"),
)
"""The headline numbers of a generation, parent vs child, and which direction is better."""


# -- writing a generation's reports ---------------------------------------------------------------------


def write_reports(directory: Path, generation_id: int, manifest: dict[str, Any], suites: dict[str, Any],
                  lineage: list[dict[str, Any]] | None = None) -> None:
    """Write report.json, report.md, report.html, README.md and plots/ into a generation's directory.

    ``suites`` is the cycle's evaluate.json (``{"parent": {..., "samples": [...]}, "candidate": {...}}``);
    ``lineage`` the rows of ``views.generations_view`` (optional: the report then shows parent and branch only).
    """
    report = build_report(generation_id, manifest, suites, lineage)
    plots = render_plots(report)
    if plots:
        (directory / "plots").mkdir(exist_ok=True)
        for name, png in plots.items():
            (directory / "plots" / f"{name}.png").write_bytes(png)
    (directory / "report.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    (directory / "report.md").write_text(markdown_report(report), encoding="utf-8")
    (directory / "report.html").write_text(html_report(report, plots), encoding="utf-8")
    (directory / "README.md").write_text(model_card(report), encoding="utf-8")


def build_report(generation_id: int, manifest: Mapping[str, Any], suites: Mapping[str, Any],
                 lineage: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The manifest plus what the pages show: headline numbers, forgetting matrix, samples, lineage, curves.

    JSON-ready: non-finite numbers become None (JSON has no NaN).
    """
    metrics = manifest.get("metrics") or {}
    candidate, parent = metrics.get("candidate") or {}, metrics.get("parent") or {}
    training = dict(manifest.get("training") or {})
    training["curves"] = normalise_curves(training.get("curves"))
    gates = list(manifest.get("gates") or [])
    return _json_safe({
        **manifest,
        "id": generation_id,
        "training": training,
        "summary": summary_rows(candidate, parent),
        "gates_passed": sum(1 for g in gates if g.get("passed")),
        "data_mix": data_mix(manifest.get("data") or {}, training),
        "forgetting": forgetting_rows(candidate, parent),
        "samples": paired_samples(suites),
        "lineage": lineage_snippet(generation_id, manifest, lineage),
    })


def summary_rows(candidate: Mapping[str, Any], parent: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Headline numbers parent -> child, each with its change and whether that change is for the better."""
    rows = []
    for key, label, better in SUMMARY_METRICS:
        before, after = _finite(parent.get(key)), _finite(candidate.get(key))
        relative = _relative(before, after)
        improved = None if relative is None or relative == 0 else (relative < 0) == (better == "lower")
        rows.append({"key": key, "label": label, "parent": before, "child": after, "relative": relative,
                     "better": better, "improved": improved})
    return rows


def data_mix(data: Mapping[str, Any], training: Mapping[str, Any]) -> dict[str, Any]:
    """Rows by outcome (in the order they flow), new rows vs the replay pool (buffer and the foundation's
    rehearsal rows), how many training sequences
    were replayed (from the per-step ``replayed``/``sequences`` curves or ``training.replayed_sequences``),
    and rows excluded per selection filter."""
    counts = data.get("counts") or {}
    new = int(counts.get("train", len(data.get("train_ids") or [])))
    pool = int(counts.get("replay", len(data.get("replay_ids") or [])))
    curves = training.get("curves") or {}
    replayed = _total(curves.get("replayed"))
    replayed = replayed if replayed is not None else _finite(training.get("replayed_sequences"))
    sequences = _total(curves.get("sequences"))
    if sequences is None and _finite(training.get("steps")) and _finite(training.get("batch_size")):
        sequences = training["steps"] * training["batch_size"]
    first = [k for k in ("interactions", "train", "held_out", "replay") if k in counts]
    ordered = [*first, *sorted(k for k in counts if k not in first)]  # the flow of rows, then the exclusions
    return {"new": new, "replay_pool": pool, "rehearsal": int(data.get("rehearsal_rows") or 0),
            "replayed": replayed, "sequences": sequences,
            "replay_share": replayed / sequences if replayed is not None and sequences else None,
            "counts": [{"key": k, "label": k.replace("excluded_", "excluded: ").replace("_", " "), "rows": counts[k]}
                       for k in ordered],
            "exclusions": {k.removeprefix("excluded_"): v for k, v in counts.items() if k.startswith("excluded_")}}


def _total(values: Any) -> float | None:
    numbers = [v for v in (_finite(x) for x in values or []) if v is not None]
    return sum(numbers) if numbers else None


def forgetting_rows(candidate: Mapping[str, Any], parent: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The forgetting matrix: held-out loss of parent and child on the new data, every earlier experience
    (by domain) and the foundation probe, with the change (a rise is forgetting)."""
    rows = [_loss_row("new data (this cycle, held out)", "new", parent.get("new_data_loss"),
                      candidate.get("new_data_loss"))]
    before, after = parent.get("experience_losses") or {}, candidate.get("experience_losses") or {}
    rows += [_loss_row(f"experience: {domain}", "experience", before.get(domain), after.get(domain))
             for domain in sorted(set(before) | set(after))]
    if parent.get("foundation_probe_loss") is not None or candidate.get("foundation_probe_loss") is not None:
        rows.append(_loss_row("foundation probe", "foundation", parent.get("foundation_probe_loss"),
                              candidate.get("foundation_probe_loss")))
    return rows


def _loss_row(name: str, kind: str, parent: Any, child: Any) -> dict[str, Any]:
    before, after = _finite(parent), _finite(child)
    delta = None if before is None or after is None else after - before
    return {"name": name, "kind": kind, "parent": before, "child": after, "delta": delta,
            "relative": _relative(before, after)}


def paired_samples(suites: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Parent's and child's answers to the same held-out prompts, side by side (matched by prompt)."""
    parent = {s.get("prompt"): s for s in (suites.get("parent") or {}).get("samples") or []}
    child = {s.get("prompt"): s for s in (suites.get("candidate") or {}).get("samples") or []}
    prompts = list(dict.fromkeys([*child, *parent]))  # the child's order first, then any the parent alone has
    return [{"prompt": prompt,
             "reference": (child.get(prompt) or parent.get(prompt) or {}).get("reference"),
             "parent": (parent.get(prompt) or {}).get("answer"),
             "child": (child.get(prompt) or {}).get("answer")} for prompt in prompts]


def normalise_curves(curves: Any) -> dict[str, list[Any]]:
    """The learner's per-step records as ``{key: [value per step]}``, whether given as that already or as a
    list of ``{"step", "loss", ...}`` records; missing values are None."""
    if not curves:
        return {}
    if isinstance(curves, Mapping):
        return {str(k): list(v) for k, v in curves.items() if isinstance(v, (list, tuple))}
    records = [r for r in curves if isinstance(r, Mapping)]
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: [r.get(k) for r in records] for k in keys}


def lineage_snippet(generation_id: int, manifest: Mapping[str, Any],
                    rows: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Where the generation sits: its ancestors (root first), siblings (the parent's other children) and children."""
    known = {r["id"]: _lineage_node(r) for r in rows or []}
    me = known.get(generation_id) or _lineage_node({"id": generation_id, **manifest, "aliases": []})
    ancestors, seen, parent = [], {generation_id}, me["parent"]
    while parent is not None and parent not in seen:
        seen.add(parent)
        node = known.get(parent) or _lineage_node({"id": parent, "parent": None, "branch": None, "status": None})
        ancestors.insert(0, node)
        parent = node["parent"]
    others = [n for n in known.values() if n["id"] != generation_id]
    return {"self": me, "ancestors": ancestors,
            "siblings": [n for n in others if me["parent"] is not None and n["parent"] == me["parent"]],
            "children": [n for n in others if n["parent"] == generation_id],
            "known": bool(rows)}


def _lineage_node(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": row.get("id"), "parent": row.get("parent"), "branch": row.get("branch"),
            "status": row.get("status"), "params": row.get("params"), "aliases": list(row.get("aliases") or [])}


# -- the renderings -------------------------------------------------------------------------------------


def html_report(report: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    """One self-contained HTML page: the plots are inlined as data URIs."""
    inline = {name: "data:image/png;base64," + base64.b64encode(png).decode("ascii") for name, png in plots.items()}
    return _templates().get_template("report.html.j2").render(r=report, plots=inline, curve_names=CURVES)


def markdown_report(report: Mapping[str, Any]) -> str:
    """Markdown for a terminal (``selftune report GEN --format md``) and for reading in a repository."""
    return _templates().get_template("report.md.j2").render(r=report, curve_stats=curve_stats(report["training"]))


def model_card(report: Mapping[str, Any]) -> str:
    """A Hugging Face model card: YAML front matter (tags, model-index with the evaluation metrics) and a body."""
    import yaml  # PyYAML: a dependency of transformers

    front = yaml.safe_dump(model_card_metadata(report), sort_keys=False, allow_unicode=True)
    body = _templates().get_template("model_card.md.j2").render(r=report)
    return f"---\n{front}---\n\n{body}"


def model_card_metadata(report: Mapping[str, Any]) -> dict[str, Any]:
    """The card's YAML metadata: what the Hub indexes (library, pipeline, tags, metrics)."""
    candidate = (report.get("metrics") or {}).get("candidate") or {}
    measured = [("loss", "held-out loss on new data", candidate.get("new_data_loss")),
                ("loss", "foundation probe loss", candidate.get("foundation_probe_loss")),
                ("accuracy", "golden prompt pass rate", candidate.get("golden_pass_rate")),
                *(("loss", f"held-out loss on experience {d}", v)
                  for d, v in sorted((candidate.get("experience_losses") or {}).items()))]
    metrics = [{"type": kind, "name": name, "value": round(float(value), 6)}
               for kind, name, value in measured if _finite(value) is not None]
    return {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["selftune", "lora", "continual-learning", f"branch-{report.get('branch')}",
                 f"status-{report.get('status')}"],
        "model-index": [{
            "name": f"selftune-generation-{report['id']}",
            "results": [{"task": {"type": "text-generation", "name": "Text generation"},
                         "dataset": {"type": "selftune-held-out", "name": f"held-out interactions of branch "
                                                                         f"{report.get('branch')}"},
                         "metrics": metrics}] if metrics else [],
        }],
    }


def curve_stats(training: Mapping[str, Any]) -> list[dict[str, Any]]:
    """First, last, minimum and mean of each drawn curve (for Markdown, where there are no plots)."""
    curves = training.get("curves") or {}
    out = []
    for key, title in CURVES:
        values = [v for v in (_finite(x) for x in curves.get(key) or []) if v is not None]
        if values:
            out.append({"key": key, "title": title, "first": values[0], "last": values[-1], "min": min(values),
                        "mean": sum(values) / len(values), "points": len(values)})
    return out


# -- plots ----------------------------------------------------------------------------------------------


def render_plots(report: Mapping[str, Any]) -> dict[str, bytes]:
    """PNG images by name (curves, forgetting, data, pruning); a plot with nothing to show is left out."""
    figures = {
        "curves": _curves_figure(report["training"].get("curves") or {}),
        "forgetting": _forgetting_figure(report["forgetting"], report["id"]),
        "data": _data_figure(report.get("data") or {}, report["data_mix"]),
        "pruning": _pruning_figure(report.get("pruning") or {}),
    }
    return {name: _png(figure) for name, figure in figures.items() if figure is not None}


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _curves_figure(curves: Mapping[str, list[Any]]) -> Figure | None:
    if not any(_finite_points(curves.get(key)) for key, _ in CURVES):
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.1), layout="constrained")
    steps = curves.get("step")
    for axes, (key, title) in zip(figure.subplots(1, len(CURVES)), CURVES):
        axes.set_title(title, fontsize=11)
        axes.set_xlabel("step")
        points = _finite_points(curves.get(key), steps)
        if not points:
            axes.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=axes.transAxes, color="#777")
            axes.set_xticks([])
            axes.set_yticks([])
            continue
        xs, ys = zip(*points)
        axes.plot(xs, ys, color="#1f6feb", linewidth=1.3, marker="o" if len(xs) < 30 else None, markersize=3)
        axes.grid(alpha=0.3)
    return figure


def _finite_points(values: list[Any] | None, steps: list[Any] | None = None) -> list[tuple[float, float]]:
    if not values:
        return []
    xs = steps if steps and len(steps) == len(values) else range(1, len(values) + 1)
    return [(float(x), y) for x, v in zip(xs, values) if (y := _finite(v)) is not None and _finite(x) is not None]


def _forgetting_figure(rows: list[dict[str, Any]], generation_id: int) -> Figure | None:
    if not any(r["parent"] is not None or r["child"] is not None for r in rows):
        return None
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    change = np.array([[0.0 if r["parent"] is not None else np.nan,
                        r["relative"] if r["relative"] is not None else np.nan] for r in rows])
    finite = np.abs(change[np.isfinite(change)])
    limit = float(min(1.0, max(0.05, finite.max() if finite.size else 0.05)))
    # green = lower loss than the parent, white = unchanged, red = higher (forgetting); grey = not measured
    cmap = LinearSegmentedColormap.from_list("forgetting", ["#1a7f37", "#ffffff", "#cf222e"]).with_extremes(bad="#e5e5e5")
    figure = Figure(figsize=(7.5, 0.55 * len(rows) + 1.4), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(np.ma.masked_invalid(change), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
    axes.set_xticks([0, 1], ["parent", f"child (generation {generation_id})"])
    axes.set_yticks(range(len(rows)), [_clip(r["name"], 48) for r in rows])
    axes.tick_params(length=0)
    for y, row in enumerate(rows):
        axes.text(0, y, _fmt(row["parent"]), ha="center", va="center", fontsize=10)
        label = _fmt(row["child"]) + (f"\n{row['relative']:+.1%}" if row["relative"] is not None else "")
        strong = row["relative"] is not None and abs(row["relative"]) > 0.6 * limit
        axes.text(1, y, label, ha="center", va="center", fontsize=10, color="white" if strong else "black")
    figure.colorbar(image, ax=axes, label="held-out loss change vs parent", format=PercentFormatter(1.0, decimals=0))
    axes.set_title("Forgetting matrix: held-out loss (red = worse than the parent)", fontsize=11)
    return figure


def _data_figure(data: Mapping[str, Any], mix: Mapping[str, Any]) -> Figure | None:
    domains = {str(k): int(v) for k, v in (data.get("domains") or {}).items()}
    held_out = int((data.get("counts") or {}).get("held_out") or 0)
    bars = [(f"train: {domain}", n, "#1f6feb") for domain, n in sorted(domains.items())]
    bars += [(label, n, colour) for label, n, colour in
             (("replay buffer (earlier data)", mix["replay_pool"], "#8250df"),
              ("rehearsal (generation 0's answers)", mix["rehearsal"], "#bf3989"),
              ("held out (evaluation)", held_out, "#9a6700")) if n]
    if not bars:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 0.4 * len(bars) + 1.1), layout="constrained")
    axes = figure.subplots()
    labels, values, colours = zip(*bars)
    positions = range(len(bars))
    axes.barh(positions, values, color=colours)
    axes.set_yticks(positions, [_clip(label, 48) for label in labels])
    axes.invert_yaxis()
    for y, value in zip(positions, values):
        axes.text(value, y, f" {value:,}", va="center", fontsize=9)
    axes.set_xlabel("rows")
    axes.set_title("Data of this cycle", fontsize=11)
    axes.margins(x=0.15)
    return figure


def _pruning_figure(pruning: Mapping[str, Any]) -> Figure | None:
    kept = {int(k): int(v) for k, v in (pruning.get("channels_kept_per_layer") or {}).items()}
    before, layers = pruning.get("intermediate_size_before"), pruning.get("layers_before")
    if not pruning.get("enabled") or not kept or not before or not layers:
        return None
    from matplotlib.figure import Figure

    removed = {int(i) for i in pruning.get("layers_removed") or []}
    figure = Figure(figsize=(7.5, 2.8), layout="constrained")
    axes = figure.subplots()
    indices = list(range(int(layers)))
    axes.bar(indices, [int(before)] * len(indices), color="#d0d7de", label="MLP channels before")
    axes.bar(indices, [kept.get(i, 0) for i in indices], color="#1f6feb", label="kept")
    for i in removed:
        axes.text(i, int(before) * 0.5, "removed", rotation=90, ha="center", va="center", color="#cf222e", fontsize=9)
    axes.set_xlabel("layer")
    axes.set_ylabel("MLP channels")
    axes.set_title("Pruning: MLP channels kept per layer", fontsize=11)
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return figure


# -- the lineage page -----------------------------------------------------------------------------------


def render_lineage_html(rows: list[dict[str, Any]], report_url: str = REPORT_URL) -> str:
    """The lineage page: per branch, its generations as a tree, with status, aliases, key metrics and links.

    ``rows`` are ``views.generations_view`` dicts, optionally with ``"metrics"`` and ``"created_at"``
    (``lineage_rows`` adds them); ``report_url`` has ``{id}`` where the generation id goes.
    """
    return _templates().get_template("lineage.html.j2").render(
        branches=lineage_branches(rows), total=len(rows), report_link=lambda i: report_url.format(id=i))


def lineage_rows(context: Context) -> list[dict[str, Any]]:
    """``generations_view`` rows with each generation's key metrics (parent -> child) and creation time."""
    from selftune.daemon.views import generations_view

    rows = generations_view(context)
    with context.store.transaction() as tx:
        generations = {g.id: g for g in tx.generations.list()}
    for row in rows:
        generation = generations.get(row["id"])
        row["created_at"] = generation.created_at.isoformat() if generation else None
        row["metrics"] = key_metrics(generation.metrics if generation else {})
    return rows


def key_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A generation's headline numbers for the lineage page (empty for the foundation, which has no suites)."""
    candidate, parent = metrics.get("candidate") or {}, metrics.get("parent") or {}
    if not candidate:
        return {}
    return {row["key"]: {"value": row["child"], "relative": row["relative"], "improved": row["improved"]}
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


# -- finding a report -----------------------------------------------------------------------------------


# -- helpers --------------------------------------------------------------------------------------------


@cache
def _templates() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("selftune.daemon.reports", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=True),
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.ChainableUndefined,
    )
    environment.filters.update(num=_fmt, brief=_brief, pct=_pct, count=_count, md=_md_cell, clip=_clip)
    environment.globals.update(status_class=_status_class)
    return environment


def _fmt(value: Any) -> str:
    """Numbers for people: 4 significant digits, thousands separators for integers, '-' for missing."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{int(value):,}" if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def _brief(value: Any) -> str:
    """A nested value in one short line: numbers per key as their range, lists by length, the rest as JSON."""
    if isinstance(value, Mapping):
        numbers = [v for v in (_finite(x) for x in value.values()) if v is not None]
        if numbers and len(numbers) == len(value):
            low, high = min(numbers), max(numbers)
            return f"{len(value)} entries, {_fmt(low)}" + ("" if low == high else f" to {_fmt(high)}")
        return _clip(json.dumps(value, default=str), 120)
    if isinstance(value, (list, tuple)):
        return _clip(", ".join(_fmt(v) for v in value), 120) if len(value) <= 12 else f"{len(value)} entries"
    return _fmt(value)


def _pct(value: Any) -> str:
    number = _finite(value)
    if number is None:
        return "-"
    return f"{number * 100:+.2g}%" if 0 < abs(number) < 0.0005 else f"{number:+.1%}"  # tiny: not "+0.0%"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else _fmt(value)


def _md_cell(value: Any) -> str:
    """User text inside a Markdown table cell or line: one line, pipes escaped, and "<" so that no HTML gets in
    (">" and "&" stay readable: alone they start no tag)."""
    text = " ".join(str("-" if value is None else value).split())
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def _clip(text: Any, limit: int = 80) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _status_class(status: Any) -> str:
    return {"promoted": "ok", "candidate": "wait", "rejected": "bad", "failed": "bad"}.get(str(status), "other")


def _finite(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _relative(before: Any, after: Any) -> float | None:
    if before is None or after is None or before == 0:
        return None
    return (after - before) / abs(before)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
