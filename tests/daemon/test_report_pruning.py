"""The report's branch configuration and its pruning section (what was removed and what it cost), from a
manifest with every key the cycle records for a pruned specialist, and from one with none of them (no model needed).

The rest of the report: test_report.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from selftune.daemon.reports.model import build_report, pruning_view
from selftune.daemon.reports.render import write_reports

LN2 = math.log(2)  # the suites record nats per byte; the reports show bits per byte (nats / ln 2)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FOUNDATION = 134_515_008  # SmolLM2-135M's parameters
STOPPED = "removing layer 18 raised the held-out loss to 0.9080, more than max_drop_cost = 0.08 above: undone"


def suite(params: int, decode: float, new_data_bits: float, probe_bits: float | None) -> dict[str, Any]:
    """An evaluation suite as the cycle records it: losses in nats per byte whose bits per byte are round."""
    return {"loss_unit": "nats/byte", "params": params, "decode_tokens_per_s": decode,
            "new_data_loss": new_data_bits * LN2, "experience_losses": {},
            "foundation_probe_loss": None if probe_bits is None else probe_bits * LN2}


def step(layer: int, bits: float, params: int, left: int, kept: bool) -> dict[str, Any]:
    return {"layer": layer, "influence": 0.01 * layer, "loss": bits * LN2, "loss_ratio": bits / 1.2, "params": params,
            "layers_left": left, "kept": kept}


def specialist_manifest() -> dict[str, Any]:
    """generation.json of a pruned specialist: vocabulary trimmed, three layers dropped stepwise, distilled."""
    return {
        "parent": 0, "branch": "jargon", "cycle": 2, "kind": "generation", "params": 95_100_000, "status": "promoted",
        "branch_config": {"domains": ["hacker_jargon", "chemistry"], "specialist": True,
                          "settings": {"pruning.enabled": True, "pruning.layer_dropping": "stepwise",
                                       "pruning.max_drop_cost": 0.08, "train.steps": 40,
                                       "trim_vocab.keep": ["<think>", "a|b"]}},
        "data": {"counts": {"train": 30, "held_out": 6}, "domains": {"hacker_jargon": 30}},
        "training": {"steps": 40, "learning_rate": 0.002, "lora_rank": 8, "batch_size": 4, "tokens": 9_000,
                     "replay_ratio": 0.25, "rehearsal_ratio": 0.1, "ewc_lambda": 0.0,
                     "curves": {"step": [1, 2], "loss": [2.0, 1.5]}},
        "pruning": {
            "enabled": True, "layer_dropping": "stepwise", "reason": "stepwise, least block influence first",
            "params_before": 106_200_000, "params_after": 95_100_000, "layers_before": 30, "layers_after": 27,
            "layers_removed": [14, 13, 17], "intermediate_size_before": 1536, "intermediate_size_after": 1536,
            "channels_kept_per_layer": {str(i): 1536 for i in range(27)},
            "loss_unpruned": 1.2 * LN2, "loss_after": 1.284 * LN2, "max_drop_cost": 0.08, "stopped": STOPPED,
            "steps": [step(14, 1.22, 102_500_000, 29, True), step(13, 1.25, 98_800_000, 28, True),
                      step(17, 1.284, 95_100_000, 27, True), step(18, 1.31, 91_400_000, 26, False)],
            "vocab": {"enabled": True, "vocab_size_before": 49_152, "vocab_size_after": 8_192,
                      "parameters_before": FOUNDATION, "parameters_after": 106_200_000, "merges_before": 48_900,
                      "merges_after": 7_900, "kept_by_reason": {"special": 17, "byte_alphabet": 256, "traffic": 5_000,
                                                                "general": 2_000, "closure": 919}},
            "heal": {"enabled": True, "kind": "distill", "steps": 100, "tokens": 51_200, "loss_first": 0.9,
                     "loss_last": 0.31, "curves": {"step": [1, 100], "loss": [0.9, 0.31]}},
        },
        "metrics": {"parent": suite(FOUNDATION, 40.0, 1.5, 1.1), "unpruned": suite(FOUNDATION, 41.0, 1.2, None),
                    "candidate": suite(95_100_000, 52.0, 1.23, 1.3)},
        "gates": [{"name": "prune_cost", "passed": True, "value": 0.025, "threshold": 0.05, "margin": 0.025,
                   "reason": "rose 2.5%"}],
        "decision": {"action": "promote", "reason": "all 1 gates passed"},
    }


@pytest.fixture()
def written(tmp_path: Path) -> Path:
    write_reports(tmp_path, 5, specialist_manifest(), {})
    return tmp_path


def pages(directory: Path) -> dict[str, str]:
    return {name: (directory / name).read_text() for name in ("report.md", "report.html", "README.md")}


def test_every_page_shows_the_branch_scope_and_its_settings(written: Path) -> None:
    for name, text in pages(written).items():
        assert "Branch configuration" in text, name
        assert "hacker_jargon, chemistry" in text and "yes (gated on its scope)" in text, name
        assert "pruning.max_drop_cost" in text and "0.08" in text and "stepwise" in text, name
    markdown = pages(written)["report.md"]
    assert "| pruning.max_drop_cost | 0.08 |" in markdown and "| train.steps | 40 |" in markdown
    assert "| trim_vocab.keep | &lt;think>, a\\|b |" in markdown  # user text: one escaped cell
    html = pages(written)["report.html"]
    assert "<tr><td><code>pruning.enabled</code></td><td>yes</td></tr>" in html and "&lt;think&gt;" in html


def test_a_generalist_says_its_scope_is_every_domain(tmp_path: Path) -> None:
    document = specialist_manifest()
    document["branch_config"] = {"domains": [], "specialist": False, "settings": {}}
    write_reports(tmp_path, 5, document, {})
    for name, text in pages(tmp_path).items():
        assert "generalist: every domain" in text and "Every setting at its default." in text, name


def test_every_page_shows_what_pruning_removed(written: Path) -> None:
    for name, text in pages(written).items():
        text = text.replace("&rarr;", "->")
        assert "Pruning: what was removed and what it cost" in text, name
        assert "49,152 -> 8,192 tokens (-83.3%)" in text and "merges 48,900 -> 7,900" in text, name
        assert "closure 919" in text, name
        assert "30 -> 27; removed 3: 14, 13, 17 (stepwise)" in text, name
        assert "distill, 100 steps, 51,200 tokens" in text and "0.9 -> 0.31" in text, name
        assert "decodes ×1.30 as fast as its parent" in text, name


def test_every_page_shows_what_pruning_cost_per_byte(written: Path) -> None:
    markdown = pages(written)["report.md"]
    assert "| parameters | 134,515,008 | 134,515,008 | 95,100,000 | -29.3% | -29.3% |" in markdown
    assert "| decode tokens/s | 40 | 41 | 52 | +26.8% | +30.0% |" in markdown
    assert "| specialty held-out loss (new data) (bits/byte) | 1.5 | 1.2 | 1.23 | +2.5% | -18.0% |" in markdown
    assert "| foundation probe loss (bits/byte) | 1.1 | - | 1.3 | - | +18.2% |" in markdown
    assert ("held-out loss before the heal (bits/byte): unpruned 1.2, budget 1.296 (+8.0%), after 1.284 (+7.0%). "
            f"Stopped: {STOPPED}.") in markdown
    assert "| 4 | 18 | 0.18 | 1.31 | +9.2% | 91,400,000 | 26 | **no: undone** |" in markdown
    assert pages(written)["README.md"].count("| parameters | 134,515,008 | 134,515,008 | 95,100,000 |") == 1
    html = pages(written)["report.html"]
    table = html.split('id="pruning-cost"')[1].split("</table>")[0]
    rows = re.findall(r'<tr><td>([^<]+)(?:<span[^>]*>\(([^)]+)\)</span>)?</td>(.*?)</tr>', table, re.S)
    cells = {label.strip(): (unit, re.findall(r'<td class="num">([^<]*)</td>', values)) for label, unit, values in rows}
    assert cells["specialty held-out loss (new data)"] == ("bits/byte", ["1.5", "1.2", "1.23", "+2.5%", "-18.0%"])
    assert cells["parameters"] == ("", ["134,515,008", "134,515,008", "95,100,000", "-29.3%", "-29.3%"])
    assert '<tr class="fail"><td class="num">4</td><td class="num">18</td>' in html
    assert "in bits/byte: unpruned 1.2, budget 1.296 (+8.0%)" in html


def test_the_pruning_cost_plot_is_written_and_inlined(written: Path) -> None:
    png = (written / "plots" / "pruning_cost.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    html = pages(written)["report.html"]
    assert re.search(r'<img class="plot" id="pruning-cost-plot"[^>]*src="data:image/png;base64,', html)
    assert not (written / "plots" / "pruning.png").exists()  # no MLP channel was cut: no channel plot
    report = json.loads((written / "report.json").read_text())
    assert report["pruning_view"]["stepwise"]["budget"] == pytest.approx(1.296)


def test_missing_keys_render_what_is_there(tmp_path: Path) -> None:
    """Layers dropped all at once, no vocab, no heal, no unpruned suite: the rest still renders, nothing crashes."""
    document = specialist_manifest()
    pruning = document["pruning"]
    for key in ("vocab", "heal", "steps", "loss_unpruned", "loss_after", "max_drop_cost", "stopped"):
        pruning.pop(key)
    pruning["layer_dropping"] = "fraction"
    del document["metrics"]["unpruned"]
    view = pruning_view(document)
    assert view["vocab"] is None and view["heal"] is None and view["stepwise"] is None
    params = view["cost"][0]
    assert params["unpruned"] == 106_200_000 and params["vs_unpruned"] == pytest.approx(95.1 / 106.2 - 1)
    write_reports(tmp_path, 5, document, {})
    markdown = (tmp_path / "report.md").read_text()
    assert "- layers: 30 -> 27; removed 3: 14, 13, 17 (fraction)" in markdown and "vocabulary" not in markdown
    assert (tmp_path / "plots" / "pruning_cost.png").exists()  # the sizes and speeds alone
    assert pruning_view({"pruning": {"enabled": True}}) == {
        "layer_dropping": None, "reason": None, "vocab": None, "layers": None, "cost": [], "decode_ratio": None,
        "stepwise": None, "heal": None}
    nothing_cut = {"enabled": True, "vocab": {"enabled": False},
                   "heal": {"enabled": False, "reason": "pruning removed nothing"}}
    write_reports(tmp_path, 5, {"pruning": nothing_cut}, {})
    assert "- heal: none (pruning removed nothing)" in (tmp_path / "report.md").read_text()


def test_a_manifest_without_pruning_or_branch_config_shows_neither(tmp_path: Path) -> None:
    document = specialist_manifest()
    del document["branch_config"]
    document["pruning"] = {"enabled": False, "heal": {"enabled": False}}
    report = build_report(5, document, {})
    assert report["branch_view"] is None and report["pruning_view"] is None
    write_reports(tmp_path, 5, document, {})
    for name, text in pages(tmp_path).items():
        assert "Branch configuration" not in text and "what it cost" not in text, name
    assert "Pruning was not enabled" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "plots" / "pruning_cost.png").exists()
