"""A real generation's report and the lineage page, checked in a real browser.

Debian's Chromium, driven by Playwright (the ``browser`` and ``open_page`` fixtures of conftest.py; no
browser download), loads each page from disk with the network off; the test records console messages,
exceptions and every request, checks that the key elements are laid out and visible, and saves a full-page
screenshot under ``test-artifacts/browser/``. If Chromium cannot be installed or started, the tests fail:
they never skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard

from selftune.daemon.context import Context
from selftune.daemon.reports.lineage import lineage_rows, render_lineage_html
from selftune.daemon.reports.render import write_reports

from .conftest import BROWSER_ARTIFACTS as ARTIFACTS
from .conftest import WatchedPage

OpenPage = Callable[[str], WatchedPage]
ROOT = Path(__file__).resolve().parents[2]
SELFTUNE = str(Path(sys.executable).with_name("selftune"))
SAMPLES = ROOT / "data" / "sample"
FAST = {  # a tiny model and a few steps: the pages, not the model, are under test here
    "SELFTUNE_REPLAY__REHEARSAL": "0",  # the untrained tiny model ends no answer: no rehearsal row would be kept
    "SELFTUNE_TRAIN__STEPS": "12", "SELFTUNE_TRAIN__BATCH_SIZE": "4", "SELFTUNE_TRAIN__MAX_LENGTH": "96",
    "SELFTUNE_TRAIN__LEARNING_RATE": "0.003", "SELFTUNE_TRAIN__THREADS": "1", "SELFTUNE_CYCLE__MAX_EVAL_ROWS": "16",
    "SELFTUNE_CYCLE__SAMPLE_ANSWERS": "3", "SELFTUNE_EWC__FISHER_EXAMPLES": "8",
    "SELFTUNE_GATES__MIN_DECODE_SPEED_RATIO": "0",  # a tiny model's decode speed is noise
    "SELFTUNE_GATES__MIN_NEW_DATA_IMPROVEMENT": "0",
    "SELFTUNE_GATES__MAX_EXPERIENCE_REGRESSION": "10", "SELFTUNE_GATES__MAX_FOUNDATION_REGRESSION": "10",
    "SELFTUNE_GATES__MAX_FOUNDATION_DRIFT": "10",  # promote both generations, so the second has a parent to compare
}
LAYOUT = """selectors => Object.fromEntries(selectors.map(sel => {
    const el = document.querySelector(sel);
    if (!el) return [sel, {found: false}];
    const box = el.getBoundingClientRect(), style = getComputedStyle(el);
    return [sel, {found: true, width: box.width, height: box.height,
                  visible: style.display !== 'none' && style.visibility !== 'hidden' && box.width > 0 && box.height > 0,
                  image: el.tagName === 'IMG' ? {complete: el.complete, width: el.naturalWidth} : null,
                  text: el.innerText.slice(0, 300)}];
}))"""
"""For each selector: found, laid out with a size, visible, and (for images) decoded."""


# -- a real lineage: generation 0, then two trained generations on two domains ---------------------------


def selftune(state: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([SELFTUNE, "--state", str(state), *args], capture_output=True, text=True,
                            env={**os.environ, **FAST, **(env or {})}, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def cycle(state: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    return json.loads(selftune(state, "cycle", "--wait", "--json", *args, env=env).stdout)


@pytest.fixture(scope="module")
def real_state(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A real lineage on the tiny model, through the real CLI and worker:

    generation 1 (python_docs, branch main, promoted); branch ``chem`` forked from it for domain chemistry;
    generation 2 (half of chemistry_elements, chem, promoted: its forgetting matrix has python);
    generation 3 (the other half, chem, rejected by a parameter gate that demands pruning).
    """
    root = tmp_path_factory.mktemp("report-state")
    state = root / "state"
    selftune(state, "init", "--foundation", str(tiny_model_dir))
    selftune(state, "ingest", str(SAMPLES / "python_docs.jsonl"))
    assert cycle(state)["status"] == "promoted"
    selftune(state, "branch", "create", "chem", "--from", "1", "--domain", "chemistry")
    rows = (SAMPLES / "chemistry_elements.jsonl").read_text().splitlines()
    waves = ((rows[:60], {}, "promoted"), (rows[60:], {"SELFTUNE_GATES__MAX_PARAMS_RATIO": "0.5"}, "rejected"))
    for wave, (lines, env, expected) in enumerate(waves):
        path = root / f"chemistry-{wave}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        selftune(state, "ingest", str(path))
        result = cycle(state, "--branch", "chem", env=env)
        assert (result["status"], result["generation"]) == (expected, wave + 2), result
    return state


def generation_dir(state: Path, generation_id: int) -> Path:
    return state / "generations" / str(generation_id)


def manifest_of(state: Path, generation_id: int) -> dict[str, Any]:
    return json.loads((generation_dir(state, generation_id) / "generation.json").read_text())


def screenshot(watched: WatchedPage, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    watched.page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def assert_clean(watched: WatchedPage) -> None:
    assert watched.problems == [], watched.problems
    external = watched.external_requests()
    assert external == [], f"the page fetched something from outside itself: {external}"


def gate_rows(page: Any) -> list[list[str]]:
    """Each gate row as [class, name, verdict, its verdict cell's colour, its background colour]."""
    return page.evaluate("[...document.querySelectorAll('#gates tbody tr')].map(r => [r.className, "
                         "r.querySelector('code').textContent, r.cells[1].textContent, "
                         "getComputedStyle(r.cells[1]).color, getComputedStyle(r.cells[0]).backgroundColor])")


GREEN, GREEN_BACKGROUND = "rgb(26, 127, 55)", "rgb(218, 251, 225)"
RED, RED_BACKGROUND = "rgb(207, 34, 46)", "rgb(255, 235, 233)"


def assert_gates_in_colour(page: Any, gates: list[dict[str, Any]]) -> None:
    expected = [["pass", g["name"], "pass", GREEN, GREEN_BACKGROUND] if g["passed"] else
                ["fail", g["name"], "FAIL", RED, RED_BACKGROUND] for g in gates]
    assert gate_rows(page) == expected


# -- the tests ------------------------------------------------------------------------------------------


def test_a_real_generations_report_shows_its_gates_heat_map_and_curves(open_page: OpenPage, real_state: Path) -> None:
    watched = open_page((generation_dir(real_state, 2) / "report.html").as_uri())
    page = watched.page
    screenshot(watched, "report-generation-2.png")
    layout = page.evaluate(LAYOUT, ["#gates table", "#forgetting-heatmap", "#training-curves", "#data-plot",
                                    "#samples .samples", "#lineage .node.me", "#status", "#replay-mix"])
    for selector, box in layout.items():
        assert box["found"] and box["visible"], (selector, box)
    for image in ("#forgetting-heatmap", "#training-curves", "#data-plot"):
        assert layout[image]["image"]["complete"] and layout[image]["image"]["width"] > 300, (image, layout[image])
    manifest = manifest_of(real_state, 2)
    assert layout["#status"]["text"] == "promoted" == manifest["status"]
    assert_gates_in_colour(page, manifest["gates"])
    suites = page.evaluate("[...document.querySelectorAll('#forgetting tbody td:first-child')].map(c => c.textContent)")
    probe = ["foundation probe"] if manifest["metrics"]["candidate"]["foundation_probe_loss"] is not None else []
    assert suites == ["new data (this cycle, held out)", "experience: python", *probe]
    assert page.evaluate("document.querySelectorAll('#samples .samples').length") == 3
    assert_clean(watched)


def test_a_real_rejected_generations_report_shows_the_failed_gate_in_red(open_page: OpenPage, real_state: Path) -> None:
    watched = open_page((generation_dir(real_state, 3) / "report.html").as_uri())
    page = watched.page
    screenshot(watched, "report-generation-3-rejected.png")
    manifest = manifest_of(real_state, 3)
    assert page.inner_text("#status") == "rejected" == manifest["status"]
    assert_gates_in_colour(page, manifest["gates"])
    failed = [row[1] for row in gate_rows(page) if row[0] == "fail"]
    assert failed == ["params_ratio"]
    suites = page.evaluate("[...document.querySelectorAll('#forgetting tbody td:first-child')].map(c => c.textContent)")
    assert {"experience: chemistry", "experience: python"} <= set(suites), suites
    assert_clean(watched)


def test_user_text_is_shown_as_text_never_run_as_markup(open_page: OpenPage, real_state: Path, tmp_path: Path) -> None:
    """The real generation's manifest with hostile sample text, gate reason and alias, written again."""
    manifest = {k: v for k, v in manifest_of(real_state, 2).items() if k not in ("id", "files", "checksum")}
    manifest["gates"][0] = {**manifest["gates"][0], "reason": "<b>bold</b> <img src=x onerror=\"console.error('x')\">"}
    hostile = "<script>console.error('pwned')</script><img src=x onerror=\"console.error('xss')\">"
    suites = {"parent": {"samples": [{"prompt": hostile, "reference": "ref", "answer": "old"}]},
              "candidate": {"samples": [{"prompt": hostile, "reference": "ref", "answer": hostile}]}}
    lineage = [{**row, "aliases": [*row["aliases"], "<i>alias</i>"]} for row in lineage_rows(Context.open(str(real_state)))]
    write_reports(tmp_path, 2, manifest, suites, lineage)
    watched = open_page((tmp_path / "report.html").as_uri())
    page = watched.page
    screenshot(watched, "report-escaping.png")
    assert page.evaluate("document.querySelectorAll('script, img:not(.plot), #gates b, #lineage i').length") == 0
    assert "<b>bold</b>" in page.evaluate("document.querySelector('#gates tbody tr').innerText")
    assert hostile in page.evaluate("document.querySelector('#samples .samples').innerText")
    assert "<i>alias</i>" in page.evaluate("document.querySelector('#lineage').innerText")
    assert_clean(watched)


def test_the_lineage_page_shows_every_generation_with_status_aliases_and_report_links(
        open_page: OpenPage, real_state: Path, tmp_path: Path) -> None:
    rows = lineage_rows(Context.open(str(real_state)))
    generations = real_state / "generations"
    page_file = tmp_path / "lineage.html"
    page_file.write_text(render_lineage_html(rows, report_url=generations.as_uri() + "/{id}/report.html"))
    watched = open_page(page_file.as_uri())
    page = watched.page
    screenshot(watched, "lineage.png")
    sections = page.evaluate("[...document.querySelectorAll('section.branch')].map(s => s.id)")
    assert sections == ["branch-main", "branch-chem"]
    nodes = page.evaluate("[...document.querySelectorAll('.node')].map(n => ({id: n.id, status: n.dataset.status, "
                          "visible: n.getBoundingClientRect().height > 0, text: n.innerText, "
                          "border: getComputedStyle(n).borderLeftColor, "
                          "link: n.querySelector('a.report') && n.querySelector('a.report').href}))")
    assert [(n["id"], n["status"]) for n in nodes] == [("generation-0", "promoted"), ("generation-1", "promoted"),
                                                       ("generation-2", "promoted"), ("generation-3", "rejected")]
    assert [n["border"] for n in nodes] == [GREEN, GREEN, GREEN, RED]
    by_id = {r["id"]: r for r in rows}
    assert by_id[1]["aliases"] == ["champion"] and by_id[2]["aliases"] == ["champion"] and by_id[3]["aliases"] == []
    for node in nodes:
        row = by_id[int(node["id"].split("-")[1])]
        assert node["visible"] and all(alias in node["text"] for alias in row["aliases"])
        if row["parent"] is None:
            assert node["link"] is None and "foundation" in node["text"]
        else:
            assert node["link"] == (generations / str(row["id"]) / "report.html").as_uri()
            assert "new-data loss" in node["text"], node
    parent_of_3 = page.evaluate("document.querySelector('#generation-3').closest('ul').closest('li').querySelector('.node').id")
    assert parent_of_3 == "generation-2"  # nested under its parent
    assert "Forked from generation 1 of branch main." in page.evaluate("document.querySelector('#branch-chem').innerText")
    page.goto(nodes[-1]["link"])  # the link leads to that generation's report
    assert page.evaluate("document.querySelector('h1').textContent").startswith("Generation 3")
    assert_clean(watched)


def test_the_generation_directory_holds_every_report_checksummed(real_state: Path) -> None:
    manifest = manifest_of(real_state, 2)
    for name in ("report.html", "report.md", "report.json", "README.md", "plots/curves.png", "plots/forgetting.png"):
        assert name in manifest["files"], name
    report = json.loads((generation_dir(real_state, 2) / "report.json").read_text())
    assert report["id"] == 2 and report["parent"] == 1 and report["branch"] == "chem"
    assert report["gates"] == manifest["gates"]
    assert len(report["training"]["curves"]["loss"]) == manifest["training"]["steps"]
    assert len(report["samples"]) == 3 and all(s["prompt"] and s["parent"] is not None and s["child"] is not None
                                                for s in report["samples"])
    card = ModelCard.load(generation_dir(real_state, 2) / "README.md")  # as the Hub reads it: model-index included
    assert card.data.library_name == "transformers" and card.data.model_name == "selftune-generation-2"
    assert (generation_dir(real_state, 0) / "README.md").is_file()  # generation 0 has its card too
