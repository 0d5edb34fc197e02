"""A generation's reports, written into its directory before it is renamed into place.

Per generation (rejected ones too): ``report.html`` (one self-contained page: CSS inline, plots as inline PNG,
no external URL), ``report.md`` (for a terminal), ``report.json`` (the report model, for programs),
``README.md`` (a Hugging Face model card) and ``plots/*.png``; generation 0 has its model card only. Templates
are jinja2 with autoescaping, because prompts, answers and domain names are user data. The cards' metadata is
huggingface_hub's ``ModelCardData``, so it is what the Hub reads (``base_model``, ``license``, ``language`` of
the foundation, from the manifest's ``card``; ``model-index`` with the evaluation).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import EvalResult, ModelCardData

from selftune.policies.records import FOUNDATION_ID

from selftune.daemon.reports import text
from selftune.daemon.reports.files import REPORT_FILES
from selftune.daemon.reports.model import CURVES, build_report, curve_stats, finite
from selftune.daemon.reports.plots import render_plots

MODEL_CARD = "README.md"
"""The model card's file name: the name the Hugging Face Hub reads."""
PLOTS = "plots"
"""The folder of the PNG plots inside a generation's directory."""


def write_reports(directory: Path, generation_id: int, manifest: dict[str, Any], suites: dict[str, Any],
                  lineage: list[dict[str, Any]] | None = None) -> None:
    """Write report.json, report.md, report.html, README.md and plots/ into a generation's directory.

    ``suites`` is the cycle's evaluate.json (``{"parent": {..., "samples": [...]}, "candidate": {...}}``);
    ``lineage`` the rows of ``views.generations_view`` (optional: the report then shows parent and branch only).
    """
    report = build_report(generation_id, manifest, suites, lineage)
    plots = render_plots(report)
    if plots:
        (directory / PLOTS).mkdir(exist_ok=True)
        for name, png in plots.items():
            (directory / PLOTS / f"{name}.png").write_bytes(png)
    (directory / REPORT_FILES["json"].name).write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    (directory / REPORT_FILES["md"].name).write_text(markdown_report(report), encoding="utf-8")
    (directory / REPORT_FILES["html"].name).write_text(html_report(report, plots), encoding="utf-8")
    (directory / MODEL_CARD).write_text(model_card(report), encoding="utf-8")


def html_report(report: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    """One self-contained HTML page: the plots are inlined as data URIs."""
    inline = {name: "data:image/png;base64," + base64.b64encode(png).decode("ascii") for name, png in plots.items()}
    return templates().get_template("report.html.j2").render(r=report, plots=inline, curve_names=CURVES)


def markdown_report(report: Mapping[str, Any]) -> str:
    """Markdown for a terminal (``selftune report GEN --format md``) and for reading in a repository."""
    return templates().get_template("report.md.j2").render(r=report, curve_stats=curve_stats(report["training"]))


def model_card(report: Mapping[str, Any]) -> str:
    """A Hugging Face model card: YAML front matter (``model_card_metadata``) and a body."""
    body = templates().get_template("model_card.md.j2").render(r=report)
    return _card(model_card_metadata(report), body)


def foundation_model_card(manifest: Mapping[str, Any]) -> str:
    """Generation 0's model card: what the foundation is, with its manifest's ``card`` facts; no evaluation."""
    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         tags=["selftune", "foundation", f"branch-{manifest.get('branch')}"], **_foundation(manifest))
    return _card(data, templates().get_template("foundation_card.md.j2").render(m=manifest))


def model_card_metadata(report: Mapping[str, Any]) -> ModelCardData:
    """The card's metadata: what the Hub indexes (the foundation as base model, its license and language;
    library, pipeline, tags; metrics as a model-index, losses as the report shows them, their unit in the name)."""
    candidate = (report.get("metrics") or {}).get("candidate") or {}
    rows = report["forgetting"]

    def losses(kind: str, name: str) -> list[tuple[str, str, Any]]:
        return [("loss", f"{name.format(r['name'].removeprefix('experience: '))} ({r['unit']})", r["child"])
                for r in rows if r["kind"] == kind]

    measured = [*losses("new", "held-out loss on new data"), *losses("foundation", "foundation probe loss"),
                ("accuracy", "golden prompt pass rate", candidate.get("golden_pass_rate")),
                *losses("experience", "held-out loss on experience {}")]
    results = [EvalResult(task_type="text-generation", task_name="Text generation", dataset_type="selftune-held-out",
                          dataset_name=f"held-out interactions of branch {report.get('branch')}",
                          metric_type=kind, metric_name=name, metric_value=round(float(value), 6))
               for kind, name, value in measured if finite(value) is not None]
    return ModelCardData(
        model_name=f"selftune-generation-{report['id']}", eval_results=results or None,  # no results: no model-index
        library_name="transformers", pipeline_tag="text-generation",
        tags=["selftune", "lora", "continual-learning", f"branch-{report.get('branch')}", f"status-{report.get('status')}"],
        **_foundation(report))


def _foundation(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The foundation's ``base_model``, ``license`` and ``language`` that the manifest's ``card`` knows."""
    card = manifest.get("card") or {}
    return {key: card[key] for key in ("base_model", "license", "language") if card.get(key)}


def _card(data: ModelCardData, body: str) -> str:
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


@cache
def templates() -> jinja2.Environment:
    """The templates of the reports and the lineage page, with the filters they format numbers and text with."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("selftune.daemon.reports", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=True),
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.ChainableUndefined,
    )
    environment.filters.update(num=text.number, brief=text.brief, pct=text.percent, count=text.count,
                               md=text.markdown_cell, clip=text.clip, ratio=text.ratio)
    environment.globals.update(status_class=text.status_class, foundation_id=FOUNDATION_ID, files=REPORT_FILES,
                               model_card=MODEL_CARD)
    return environment
