"""Generation reports and the lineage page, from a realistic manifest (no model needed): content, escaping,
self-containment, the model card, the lineage tree, and `selftune report`.

The same pages from a real trained generation, in a real browser: test_browser_report.py.
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from selftune.daemon.cli import main as cli
from selftune.daemon.cli.report import report as report_command
from selftune.daemon.context import Context
from selftune.daemon.reports.lineage import lineage_rows, render_lineage_html
from selftune.daemon.reports.model import build_report, forgetting_rows, lineage_snippet, normalise_curves
from selftune.daemon.reports.render import write_reports

HOSTILE = "<script>alert('x')</script> a | b & c"
LN2 = math.log(2)  # the suites record nats per byte; the reports show bits per byte (nats / ln 2)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def manifest(status: str = "promoted") -> dict[str, Any]:
    """A generation.json as recipe.generation_manifest writes it (trimmed id lists), for generation 3.

    Its losses are nats per byte whose bits per byte are round numbers (2.31, 1.62, ...), per token beside."""
    steps = list(range(1, 13))
    failed = status == "rejected"
    parent = {"loss_unit": "nats/byte", "new_data_loss": 2.31 * LN2,
              "experience_losses": {"python": 1.42 * LN2, "chemistry_elements": 1.95 * LN2},
              "foundation_probe_loss": 1.10 * LN2, "golden_pass_rate": None, "golden_count": 0, "params": 1000,
              "decode_tokens_per_s": 40.0, "per_token_unit": "nats/token", "new_data_loss_per_token": 6.5,
              "experience_losses_per_token": {"python": 4.1, "chemistry_elements": 5.25},
              "foundation_probe_loss_per_token": 3.0}
    candidate = {"loss_unit": "nats/byte", "new_data_loss": 1.62 * LN2,
                 "experience_losses": {"python": 1.47 * LN2, "chemistry_elements": 2.21 * LN2},
                 "foundation_probe_loss": 1.13 * LN2, "golden_pass_rate": None, "golden_count": 0, "params": 900,
                 "decode_tokens_per_s": 44.0, "per_token_unit": "nats/token", "new_data_loss_per_token": 4.5,
                 "experience_losses_per_token": {"python": 4.25, "chemistry_elements": 6.0},
                 "foundation_probe_loss_per_token": 3.125}
    return {
        "parent": 2, "branch": "main", "cycle": 7, "kind": "generation", "params": 900, "status": status,
        "data": {"counts": {"train": 18, "held_out": 2, "excluded_near_duplicate": 3, "replay": 6, "interactions": 23},
                 "domains": {"python": 12, "chemistry_elements": 6}, "train_ids": list(range(1, 19)),
                 "held_out_ids": [19, 20], "replay_ids": [90, 91, 92, 93, 94, 95], "rehearsal_rows": 64, "cutoff": {"main": 23}},
        "training": {"steps": 12, "learning_rate": 0.003, "lora_rank": 8, "batch_size": 4, "tokens": 4321,
                     "replay_ratio": 0.25, "rehearsal_ratio": 0.125, "ewc_lambda": 100.0,
                     "curves": [{"step": s, "loss": 3.0 - 0.1 * s, "ewc_penalty": 0.001 * s, "tokens_per_s": 400.0 + s,
                                 "sequences": 4, "replayed": 1} for s in steps]},
        "merge": {"rank_after": 8, "ranks_after": {"q_proj": 8, "v_proj": 6}, "dtype": "float32"},
        "pruning": {"enabled": True, "reason": "one layer below budget", "params_before": 1000, "params_after": 900,
                    "layers_before": 2, "layers_after": 1, "layers_removed": [1], "intermediate_size_before": 128,
                    "intermediate_size_after": 96, "channels_kept_per_layer": {"0": 96}},
        "fisher": {"examples": 8},
        "metrics": {"candidate": candidate, "parent": parent, "cutoff": {"main": 23}, "experiences": {"python": [19]}},
        "gates": [
            {"name": "new_data_improvement", "passed": True, "value": -0.2987, "threshold": 0.02, "margin": 0.2787,
             "reason": "fell 29.9%"},
            {"name": "experience_regression[chemistry_elements]", "passed": not failed, "value": 0.1333,
             "threshold": 0.05 if failed else 0.2, "margin": -0.0833 if failed else 0.0667, "reason": "rose 13.3%"},
            {"name": "decode_speed_ratio", "passed": True, "value": None, "threshold": 0.8, "margin": None,
             "reason": "decode speed not measured: no budget set"},
        ],
        "decision": {"action": "reject" if failed else "promote",
                     "reason": "1 gate(s) failed" if failed else "all 3 gates passed"},
    }


def suites() -> dict[str, Any]:
    prompts = [(HOSTILE, "ref | one", "parent <b>answer</b>", "child answer\non two lines"),
               ("What is the symbol of iron?", "Fe", "Ir", "Fe")]
    return {"parent": {"new_data_loss": 2.31, "samples": [{"prompt": p, "reference": r, "answer": a} for p, r, a, _ in prompts]},
            "candidate": {"new_data_loss": 1.62, "samples": [{"prompt": p, "reference": r, "answer": c} for p, r, _, c in prompts]}}


LINEAGE = [
    {"id": 0, "parent": None, "branch": "main", "status": "promoted", "params": 1000, "path": "/s/0", "aliases": []},
    {"id": 1, "parent": 0, "branch": "main", "status": "promoted", "params": 1000, "path": "/s/1", "aliases": []},
    {"id": 2, "parent": 1, "branch": "main", "status": "promoted", "params": 1000, "path": "/s/2", "aliases": ["champion"]},
    {"id": 4, "parent": 2, "branch": "chem", "status": "rejected", "params": 900, "path": "/s/4", "aliases": []},
]


@pytest.fixture()
def written(tmp_path: Path) -> Path:
    write_reports(tmp_path, 3, manifest(), suites(), lineage=LINEAGE)
    return tmp_path


def test_every_report_file_and_plot_is_written(written: Path) -> None:
    assert {p.name for p in written.iterdir()} == {"report.html", "report.md", "report.json", "README.md", "plots"}
    plots = {p.name: p.read_bytes() for p in (written / "plots").iterdir()}
    assert set(plots) == {"curves.png", "forgetting.png", "data.png", "pruning.png", "pruning_cost.png"}
    assert all(png.startswith(PNG_MAGIC) and len(png) > 5000 for png in plots.values())


def test_the_html_report_is_one_self_contained_file_with_the_plots_inline(written: Path) -> None:
    html = (written / "report.html").read_text()
    inline = re.findall(r'<img class="plot" id="([\w-]+)"[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert [name for name, _ in inline] == ["forgetting-heatmap", "training-curves", "data-plot", "pruning-cost-plot",
                                            "pruning-plot"]
    assert base64.b64decode(inline[0][1]) == (written / "plots" / "forgetting.png").read_bytes()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(|<link|<script""", html, re.I)
    assert "<style>" in html and ":root" in html
    assert "<dt>ranks after</dt><dd>2 entries, 6 to 8</dd>" in html  # nested values stay one short line
    assert "12 of 48 training sequences (25.0%) were replayed; the configured replay ratio is 0.25, the rehearsal ratio 0.125." in html


def test_the_html_report_shows_every_gate_in_green_or_red(tmp_path: Path) -> None:
    write_reports(tmp_path, 3, manifest("rejected"), suites())
    html = (tmp_path / "report.html").read_text()
    rows = re.findall(r'<tr class="(pass|fail)">\s*<td><code>([^<]+)</code></td>\s*<td class="verdict">(\w+)</td>\s*'
                      r'<td class="num">([^<]*)</td>\s*<td class="num">([^<]*)</td>\s*<td class="num">([^<]*)</td>', html)
    assert rows == [("pass", "new_data_improvement", "pass", "-0.2987", "0.02", "0.2787"),
                    ("fail", "experience_regression[chemistry_elements]", "FAIL", "0.1333", "0.05", "-0.0833"),
                    ("pass", "decode_speed_ratio", "pass", "-", "0.8", "-")]
    assert '<span class="badge bad" id="status">rejected</span>' in html
    assert "gates passed <b>2/3</b>" in html


def test_the_html_replay_mix_names_the_buffer_and_the_foundation_rehearsal(written: Path) -> None:
    html = (written / "report.html").read_text()
    assert "a replay buffer of 6 rows of earlier experiences and 64 rehearsal rows" in html


def test_user_text_is_escaped_in_html_and_markdown(written: Path) -> None:
    html = (written / "report.html").read_text()
    assert "<script>" not in html and "<b>answer" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; a | b &amp; c" in html
    markdown = (written / "report.md").read_text()
    assert "### 1. &lt;script>alert('x')&lt;/script> a \\| b & c" in markdown
    assert "&gt;" not in markdown and "&amp;" not in markdown  # "->" in gate reasons reads as "->"
    assert "- child (generation 3): child answer on two lines" in markdown  # one line: the list item stays whole


def test_the_forgetting_matrix_has_every_earlier_domain_and_the_foundation_probe() -> None:
    metrics = manifest()["metrics"]
    rows = forgetting_rows(metrics["candidate"], metrics["parent"])
    assert [(r["name"], r["kind"]) for r in rows] == [
        ("new data (this cycle, held out)", "new"), ("experience: chemistry_elements", "experience"),
        ("experience: python", "experience"), ("foundation probe", "foundation")]
    chemistry = rows[1]  # in bits per byte, the per-token figures beside
    assert chemistry["unit"] == "bits/byte" and chemistry["per_token"] == {"parent": 5.25, "child": 6.0, "unit": "nats/token"}
    assert chemistry["parent"] == pytest.approx(1.95) and chemistry["child"] == pytest.approx(2.21)
    assert math.isclose(chemistry["delta"], 0.26) and math.isclose(chemistry["relative"], 0.26 / 1.95)
    # a domain the parent never saw has no change; no foundation probe on either side: no row
    rows = forgetting_rows({"new_data_loss": 1.0, "experience_losses": {"new": 2.0}}, {"new_data_loss": 1.5})
    assert [(r["name"], r["parent"], r["relative"]) for r in rows] == [
        ("new data (this cycle, held out)", 1.5, pytest.approx(-1 / 3)), ("experience: new", None, None)]


def test_losses_show_their_unit_bits_per_byte_with_the_per_token_figures_beside(written: Path) -> None:
    html = (written / "report.html").read_text()
    assert '<div class="label">new-data loss <span class="unit">(bits/byte)</span></div>' in html
    assert "per token: 4.5, parent 6.5 nats/token" in html
    assert 'in <span id="loss-unit">bits/byte</span>' in html
    assert '<th class="num">parent (bits/byte)</th><th class="num">child (bits/byte)</th>' in html
    assert '<td class="num muted">5.25</td><td class="num muted">6</td>' in html
    report = json.loads((written / "report.json").read_text())
    assert report["loss_unit_shown"] == "bits/byte"
    assert report["summary"][0]["unit"] == "bits/byte" and report["summary"][3]["unit"] is None  # parameters
    assert report["metrics"]["candidate"]["loss_unit"] == "nats/byte"  # the record itself stays as measured


def test_a_generation_recorded_per_token_is_shown_per_token_and_says_so(tmp_path: Path) -> None:
    """A generation.json written before losses were per byte (no loss_unit): its numbers as they were measured."""
    old = manifest()
    for suite in (old["metrics"]["candidate"], old["metrics"]["parent"]):
        for key in [k for k in suite if k == "loss_unit" or "per_token" in k]:
            del suite[key]
    old["metrics"]["parent"]["new_data_loss"], old["metrics"]["candidate"]["new_data_loss"] = 2.31, 1.62
    write_reports(tmp_path, 3, old, suites())
    markdown = (tmp_path / "report.md").read_text()
    assert "| new-data loss (nats/token) | 2.31 | 1.62 | -29.9% (better) |" in markdown
    assert "## Forgetting matrix (held-out loss in nats/token; a rise is forgetting)" in markdown
    assert "| new data (this cycle, held out) | 2.31 | 1.62 | -0.69 | -29.9% |\n" in markdown  # no per-token columns
    assert "per token" not in markdown
    html = (tmp_path / "report.html").read_text()
    assert '<th class="num">parent (nats/token)</th>' in html and "per token:" not in html
    meta = yaml.safe_load((tmp_path / "README.md").read_text().split("---")[1])
    assert {m["name"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}[
        "held-out loss on new data (nats/token)"] == 1.62


def test_report_json_is_strict_json_even_with_non_finite_numbers(tmp_path: Path) -> None:
    broken = manifest("rejected")
    broken["metrics"]["candidate"]["new_data_loss"] = float("nan")
    broken["training"]["curves"][3]["loss"] = float("inf")
    write_reports(tmp_path, 3, broken, suites())
    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert report["metrics"]["candidate"]["new_data_loss"] is None
    assert report["training"]["curves"]["loss"][3] is None and report["training"]["curves"]["step"][:2] == [1, 2]
    assert report["forgetting"][0] == {"name": "new data (this cycle, held out)", "kind": "new", "unit": "bits/byte",
                                       "parent": pytest.approx(2.31), "child": None, "delta": None, "relative": None,
                                       "per_token": {"parent": 6.5, "child": 4.5, "unit": "nats/token"}}
    assert report["samples"][1] == {"prompt": "What is the symbol of iron?", "reference": "Fe", "parent": "Ir", "child": "Fe"}
    assert report["gates"] == broken["gates"] and report["data"]["train_ids"] == list(range(1, 19))


def test_curves_come_as_records_or_columns_and_missing_ones_are_said_to_be_missing(tmp_path: Path) -> None:
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "tokens_per_s": 300.0}]
    assert normalise_curves(records) == {"step": [1, 2], "loss": [2.0, 1.5], "tokens_per_s": [None, 300.0]}
    assert normalise_curves({"loss": [2.0, 1.5], "note": "x"}) == {"loss": [2.0, 1.5]}
    assert normalise_curves(None) == {} and normalise_curves([]) == {}
    bare = manifest()
    bare["training"].pop("curves")
    bare["pruning"] = {"enabled": False}
    write_reports(tmp_path, 3, bare, {})
    html = (tmp_path / "report.html").read_text()
    assert "No per-step training curves were recorded." in html and 'id="training-curves"' not in html
    assert "Pruning was not enabled for this cycle." in html and "No sample answers were recorded." in html
    assert not (tmp_path / "plots" / "curves.png").exists() and not (tmp_path / "plots" / "pruning.png").exists()
    assert "No per-step training curves were recorded." in (tmp_path / "report.md").read_text()


def test_the_markdown_report_summarises_for_a_terminal(written: Path) -> None:
    markdown = (written / "report.md").read_text()
    assert markdown.startswith("# Generation 3: PROMOTED\n")
    assert "| new-data loss (bits/byte) | 2.31 | 1.62 | -29.9% (better) |" in markdown
    assert "| new-data loss, per token (nats/token) | 6.5 | 4.5 | - |" in markdown
    assert "## Forgetting matrix (held-out loss in bits/byte; a rise is forgetting)" in markdown
    assert "| experience_regression[chemistry_elements] | pass | 0.1333 | 0.2 | 0.0667 |" in markdown
    assert "- experience_regression[chemistry_elements]: rose 13.3%" in markdown
    assert "| experience: chemistry_elements | 1.95 | 2.21 | 0.26 | +13.3% | 5.25 | 6 |" in markdown
    assert "| training loss (nats/token) | 2.9 | 1.8 | 1.8 | 2.35 | 12 |" in markdown
    assert "| parameters | 1,000 | 1,000 | 900 | -10.0% | -10.0% |" in markdown  # unpruned: the prune step's count
    assert "- layers: 2 -> 1; removed 1: 1\n- MLP channels per layer: 128 -> 96\n" in markdown
    assert "- filters applied: near duplicate (3 excluded)." in markdown
    assert ("- replay: a buffer of 6 rows of earlier experiences and 64 rehearsal rows (generation 0's own answers) "
            "beside 18 new rows; 12 of 48 training sequences "
            "(25.0%) were replayed; configured ratio 0.25 (rehearsal 0.125).") in markdown
    assert "- path: 0 (main, promoted) -> 1 (main, promoted) -> 2 (main, promoted) -> **3** (main, promoted)" in markdown
    assert "- siblings (other children of generation 2): 4 (chem, rejected)." in markdown


def test_the_model_card_has_hugging_face_metadata_and_the_metrics(written: Path) -> None:
    card = (written / "README.md").read_text()
    front, body = re.fullmatch(r"---\n(.*?)\n---\n\n(.*)", card, re.S).groups()
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"selftune", "branch-main", "status-promoted"} <= set(meta["tags"])
    (index,) = meta["model-index"]
    assert index["name"] == "selftune-generation-3"
    metrics = {m["name"]: m["value"] for m in index["results"][0]["metrics"]}
    assert metrics == {"held-out loss on new data (bits/byte)": 1.62, "foundation probe loss (bits/byte)": 1.13,
                       "held-out loss on experience chemistry_elements (bits/byte)": 2.21,
                       "held-out loss on experience python (bits/byte)": 1.47}
    assert "| new-data loss (bits/byte) | 2.31 | 1.62 | -29.9% |" in body
    assert body.startswith("# selftune generation 3") and "| new_data_improvement | pass |" in body


def test_the_lineage_snippet_places_the_generation_among_ancestors_siblings_and_children() -> None:
    snippet = lineage_snippet(3, manifest(), LINEAGE)
    assert [a["id"] for a in snippet["ancestors"]] == [0, 1, 2]
    assert snippet["self"] == {"id": 3, "parent": 2, "branch": "main", "status": "promoted", "params": 900, "aliases": []}
    assert [s["id"] for s in snippet["siblings"]] == [4] and snippet["children"] == []
    later = [*LINEAGE, {"id": 3, "parent": 2, "branch": "main", "status": "promoted", "params": 900, "path": "",
                        "aliases": ["champion"]}, {"id": 5, "parent": 3, "branch": "main", "status": "rejected",
                                                   "params": 900, "path": "", "aliases": []}]
    snippet = lineage_snippet(3, manifest(), later)
    assert snippet["self"]["aliases"] == ["champion"] and [c["id"] for c in snippet["children"]] == [5]
    alone = lineage_snippet(3, manifest(), None)
    assert [a["id"] for a in alone["ancestors"]] == [2] and not alone["known"]
    html = build_report(3, manifest(), {}, LINEAGE)
    assert html["lineage"]["siblings"][0]["branch"] == "chem"


def test_the_lineage_page_is_a_tree_per_branch_with_status_aliases_metrics_and_links() -> None:
    rows = [dict(r) for r in LINEAGE] + [
        {"id": 3, "parent": 2, "branch": "main", "status": "candidate", "params": 900, "path": "",
         "aliases": ["challenger", "<i>odd</i>"], "created_at": "2026-01-02T03:04:05+00:00",
         "metrics": {"new_data_loss": {"value": 1.62, "relative": -0.2987, "improved": True}}}]
    html = render_lineage_html(rows)
    assert [b for b in re.findall(r'<section class="branch" id="branch-(\w+)">', html)] == ["main", "chem"]
    statuses = re.findall(r'<span class="node (\w+)" id="generation-(\d+)" data-status="(\w+)">', html)
    assert statuses == [("ok", "0", "promoted"), ("ok", "1", "promoted"), ("ok", "2", "promoted"),
                        ("wait", "3", "candidate"), ("bad", "4", "rejected")]
    assert 'href="/v1/generations/3/report"' in html and 'href="/v1/generations/0/report"' not in html
    assert '<span class="badge alias">&lt;i&gt;odd&lt;/i&gt;</span>' in html and "<i>odd" not in html
    assert "new-data loss 1.62" in html and "(-29.9%)" in html and "2026-01-02 03:04" in html
    assert 'Forked from <a href="#generation-2">generation 2</a> of branch main.' in html
    # generation 3 is nested in 2's list, which is nested in 1's
    main = html.split('id="branch-main"')[1].split("</section>")[0]
    assert main.index('id="generation-1"') < main.index('id="generation-2"') < main.index('id="generation-3"')
    assert main.count("<ul>") == 3
    assert 'href="file:///g/3/report.html"' in render_lineage_html(rows, report_url="file:///g/{id}/report.html")
    assert "No generations yet" in render_lineage_html([])


# -- with a real state directory: lineage_rows and `selftune report` ----------------------------------------


@pytest.fixture()
def state(tmp_path: Path) -> Path:
    """Generation 0 (no report), 1 (promoted, main) and 2 (rejected, branch chem forked from 1), on disk and in the database."""
    state = tmp_path / "state"
    context = Context.open(str(state))
    artifacts = context.artifacts
    artifacts.write(0, lambda d: (d / "config.json").write_text("{}") and None, {"parent": None, "branch": "main"})
    for generation_id, parent, branch, status in ((1, 0, "main", "promoted"), (2, 1, "chem", "rejected")):
        document = {**manifest(status), "parent": parent, "branch": branch}
        artifacts.write(generation_id, lambda d, g=generation_id, m=document: write_reports(d, g, m, suites()), document)
    with context.store.transaction(write=True) as tx:
        tx.branches.create("main")
        tx.generations.add("main", str(artifacts.root / "0"), "c0", 1000, status="promoted", id=0)
        tx.generations.add("main", str(artifacts.root / "1"), "c1", 900, parent_id=0, status="promoted",
                           metrics=manifest()["metrics"], id=1)
        tx.branches.create("chem", root_generation_id=1, domains=["chemistry"])
        tx.generations.add("chem", str(artifacts.root / "2"), "c2", 900, parent_id=1, status="rejected",
                           metrics=manifest("rejected")["metrics"], id=2)
        tx.aliases.set("main", "champion", 1)
        tx.aliases.set("chem", "champion", 1)
    context.store.engine.dispose()
    return state


def test_lineage_rows_add_key_metrics_and_times_to_the_generations_view(state: Path) -> None:
    rows = lineage_rows(Context.open(str(state)))
    assert [(r["id"], r["parent"], r["branch"], r["status"], r["aliases"]) for r in rows] == [
        (0, None, "main", "promoted", []), (1, 0, "main", "promoted", ["champion", "chem:champion"]),
        (2, 1, "chem", "rejected", [])]
    assert rows[0]["metrics"] == {} and rows[0]["created_at"]
    assert rows[1]["metrics"]["new_data_loss"] == {"value": pytest.approx(1.62), "relative": pytest.approx(-0.2987, abs=1e-4),
                                                   "improved": True, "unit": "bits/byte"}
    assert rows[1]["metrics"]["decode_tokens_per_s"]["improved"] is True
    assert "golden_pass_rate" not in rows[1]["metrics"]  # not measured: not shown
    html = render_lineage_html(rows)
    assert html.count('class="report"') == 2 and "Forked from" in html
    assert "new-data loss 1.62 bits/byte" in html


def run_report(state: Path, *args: str) -> Any:
    app = typer.Typer()
    app.callback()(cli.main)
    app.command()(report_command)
    return CliRunner().invoke(app, ["--state", str(state), "report", *args])


def test_selftune_report_prints_markdown_json_or_the_html_path(state: Path) -> None:
    markdown = run_report(state, "1")
    assert markdown.exit_code == 0, markdown.output
    assert markdown.output == (state / "generations" / "1" / "report.md").read_text()  # piped: the source itself
    as_json = run_report(state, "2", "--format", "json")
    assert as_json.exit_code == 0 and json.loads(as_json.output)["status"] == "rejected"
    html = run_report(state, "2", "--format", "HTML")
    assert html.exit_code == 0 and html.output.strip() == str(state / "generations" / "2" / "report.html")


def test_selftune_report_names_what_is_wrong(state: Path) -> None:
    foundation = run_report(state, "0")
    assert foundation.exit_code != 0 and "generation 0 has no report.md" in str(foundation.exception)
    unknown = run_report(state, "9", "--format", "json")
    assert unknown.exit_code != 0 and "9" in str(unknown.exception)
    bad = run_report(state, "1", "--format", "pdf")
    assert bad.exit_code == 1 and "--format 'pdf': use one of html, md, json" in bad.output
    clash = run_report(state, "1", "--format", "md", "--open")
    assert clash.exit_code == 1 and "--open shows the HTML report" in clash.output
