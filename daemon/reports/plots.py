"""A generation's plots as PNG images: training curves, the forgetting matrix, the data of the cycle, pruning
(MLP channels kept, and what pruning removed and cost).

matplotlib's Agg canvas is used directly (no pyplot, no global backend), and matplotlib and numpy are imported
only when a plot is drawn, so that importing the reports (the HTTP app, the CLI) stays cheap.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from selftune.policies.records import FOUNDATION_ID

from selftune.daemon.reports.model import CURVES, finite
from selftune.daemon.reports.text import clip, compact, number

if TYPE_CHECKING:
    from matplotlib.figure import Figure  # only when drawing: see the module docstring


def render_plots(report: Mapping[str, Any]) -> dict[str, bytes]:
    """PNG images by name (curves, forgetting, data, pruning, pruning_cost); a plot with nothing to show is left
    out."""
    figures = {
        "curves": _curves_figure(report["training"].get("curves") or {}),
        "forgetting": _forgetting_figure(report["forgetting"], report["id"], report.get("loss_unit_shown")),
        "data": _data_figure(report.get("data") or {}, report["data_mix"]),
        "pruning": _pruning_figure(report.get("pruning") or {}),
        "pruning_cost": _pruning_cost_figure(report.get("pruning_view")),
    }
    return {name: _png(figure) for name, figure in figures.items() if figure is not None}


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _curves_figure(curves: Mapping[str, list[Any]]) -> Figure | None:
    if not any(_finite_points(curves.get(key)) for key, _ in CURVES):
        return None
    from matplotlib.figure import Figure  # only when drawing: see the module docstring

    figure = Figure(figsize=(11, 3.1), layout="constrained")
    steps = curves.get("step")
    for axes, (key, title) in zip(figure.subplots(1, len(CURVES)), CURVES):
        axes.set_title(title, fontsize=11)
        axes.set_xlabel("step")
        points = _finite_points(curves.get(key), steps)
        if not points:
            _not_recorded(axes, "not recorded")
            continue
        xs, ys = zip(*points)
        axes.plot(xs, ys, color="#1f6feb", linewidth=1.3, marker="o" if len(xs) < 30 else None, markersize=3)
        axes.grid(alpha=0.3)
    return figure


def _finite_points(values: list[Any] | None, steps: list[Any] | None = None) -> list[tuple[float, float]]:
    if not values:
        return []
    xs = steps if steps and len(steps) == len(values) else range(1, len(values) + 1)
    return [(float(x), y) for x, v in zip(xs, values) if (y := finite(v)) is not None and finite(x) is not None]


def _forgetting_figure(rows: list[dict[str, Any]], generation_id: int, unit: str | None) -> Figure | None:
    if not any(r["parent"] is not None or r["child"] is not None for r in rows):
        return None
    import numpy as np  # only when drawing, as matplotlib (see the module docstring)
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    change = np.array([[0.0 if r["parent"] is not None else np.nan,
                        r["relative"] if r["relative"] is not None else np.nan] for r in rows])
    magnitudes = np.abs(change[np.isfinite(change)])
    limit = float(min(1.0, max(0.05, magnitudes.max() if magnitudes.size else 0.05)))
    # green = lower loss than the parent, white = unchanged, red = higher (forgetting); grey = not measured
    cmap = LinearSegmentedColormap.from_list("forgetting", ["#1a7f37", "#ffffff", "#cf222e"]).with_extremes(bad="#e5e5e5")
    figure = Figure(figsize=(7.5, 0.55 * len(rows) + 1.4), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(np.ma.masked_invalid(change), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
    axes.set_xticks([0, 1], ["parent", f"child (generation {generation_id})"])
    axes.set_yticks(range(len(rows)), [clip(r["name"], 48) for r in rows])
    axes.tick_params(length=0)
    for y, row in enumerate(rows):
        axes.text(0, y, number(row["parent"]), ha="center", va="center", fontsize=10)
        label = number(row["child"]) + (f"\n{row['relative']:+.1%}" if row["relative"] is not None else "")
        strong = row["relative"] is not None and abs(row["relative"]) > 0.6 * limit
        axes.text(1, y, label, ha="center", va="center", fontsize=10, color="white" if strong else "black")
    figure.colorbar(image, ax=axes, label="held-out loss change vs parent", format=PercentFormatter(1.0, decimals=0))
    axes.set_title(f"Forgetting matrix: held-out loss in {unit or '-'} (red = worse than the parent)", fontsize=11)
    return figure


def _data_figure(data: Mapping[str, Any], mix: Mapping[str, Any]) -> Figure | None:
    domains = {str(k): int(v) for k, v in (data.get("domains") or {}).items()}
    held_out = int((data.get("counts") or {}).get("held_out") or 0)
    bars = [(f"train: {domain}", n, "#1f6feb") for domain, n in sorted(domains.items())]
    bars += [(label, n, colour) for label, n, colour in
             (("replay buffer (earlier data)", mix["replay_pool"], "#8250df"),
              (f"rehearsal (generation {FOUNDATION_ID}'s answers)", mix["rehearsal"], "#bf3989"),
              ("held out (evaluation)", held_out, "#9a6700")) if n]
    if not bars:
        return None
    from matplotlib.figure import Figure  # only when drawing: see the module docstring

    figure = Figure(figsize=(7.5, 0.4 * len(bars) + 1.1), layout="constrained")
    axes = figure.subplots()
    labels, values, colours = zip(*bars)
    positions = range(len(bars))
    axes.barh(positions, values, color=colours)
    axes.set_yticks(positions, [clip(label, 48) for label in labels])
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
    if finite(pruning.get("intermediate_size_after")) == before:  # no channel cut: the layers are in pruning_cost
        return None
    from matplotlib.figure import Figure  # only when drawing: see the module docstring

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


def _pruning_cost_figure(view: Mapping[str, Any] | None) -> Figure | None:
    """Left: the specialty's loss after each stepwise removal, against the unpruned loss and the budget above it;
    right: parameters and decode speed of parent, unpruned and pruned, relative to the parent."""
    stepwise = (view or {}).get("stepwise") or {}
    bars = [r for r in (view or {}).get("cost") or [] if r["unit"] is None]  # the sizes and speeds, not the losses
    if stepwise.get("unpruned") is None and not bars:
        return None
    from matplotlib.figure import Figure  # only when drawing: see the module docstring

    figure = Figure(figsize=(11, 3.4), layout="constrained")
    losses, sizes = figure.subplots(1, 2, width_ratios=(3, 2))
    if stepwise.get("unpruned") is not None:
        _removal_losses(losses, stepwise)
    else:
        _not_recorded(losses, "no stepwise removals recorded")
    if bars:
        _cost_bars(sizes, bars)
    else:
        _not_recorded(sizes, "sizes and speeds not recorded")
    return figure


def _removal_losses(axes: Any, stepwise: Mapping[str, Any]) -> None:
    unpruned, budget, unit = stepwise["unpruned"], stepwise.get("budget"), stepwise.get("unit") or "-"
    steps = [(i, s) for i, s in enumerate(stepwise.get("steps") or [], 1) if s["loss"] is not None]
    kept = [(0, unpruned)] + [(i, s["loss"]) for i, s in steps if s["kept"]]
    axes.plot(*zip(*kept), color="#1f6feb", marker="o", linewidth=1.5, label="kept")
    for i, step in steps:
        if not step["kept"]:
            axes.plot([kept[-1][0], i], [kept[-1][1], step["loss"]], color="#cf222e", linestyle="--", linewidth=1)
            axes.plot([i], [step["loss"]], color="#cf222e", marker="X", markersize=9, linestyle="none",
                      label="over budget: undone")
    axes.axhline(unpruned, color="#57606a", linestyle="--", linewidth=1, label=f"unpruned {number(unpruned)}")
    if budget is not None:
        axes.axhline(budget, color="#cf222e", linestyle=":", linewidth=1.2,
                     label=f"budget {number(budget)} (+{stepwise['max_cost']:.0%})")
    axes.set_xticks([0, *(i for i, _ in steps)], ["none", *(str(s["layer"]) for _, s in steps)])
    axes.set_xlabel("layer removed, in order")
    axes.set_ylabel(f"held-out loss ({unit})")
    axes.set_title("Specialty loss after each layer removal (before the heal)", fontsize=11)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, frameon=False)


def _cost_bars(axes: Any, rows: list[Mapping[str, Any]]) -> None:
    """Each row's parent, unpruned and pruned value as bars relative to the parent, labelled with the value."""
    width = 0.26
    for offset, (key, label, colour) in enumerate((("parent", "parent", "#8c959f"), ("unpruned", "unpruned", "#80b3ff"),
                                                   ("pruned", "pruned", "#1f6feb"))):
        for x, row in enumerate(rows):
            base = row["parent"] or row["unpruned"] or row["pruned"]
            if row[key] is None or not base:
                continue
            height = row[key] / base
            axes.bar(x + (offset - 1) * width, height, width, color=colour, label=label if x == 0 else None)
            axes.text(x + (offset - 1) * width, height, compact(row[key]), ha="center", va="bottom", fontsize=8)
    axes.axhline(1.0, color="#57606a", linewidth=0.8)
    axes.set_xticks(range(len(rows)), [r["label"] for r in rows])
    axes.set_ylabel("relative to the parent")
    axes.set_title("Size and decode speed", fontsize=11)
    axes.margins(y=0.15)
    axes.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _not_recorded(axes: Any, message: str) -> None:
    axes.text(0.5, 0.5, message, ha="center", va="center", transform=axes.transAxes, color="#777")
    axes.set_xticks([])
    axes.set_yticks([])
