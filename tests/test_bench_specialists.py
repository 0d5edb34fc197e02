"""bench/bench_specialists.py: its measuring and printing on the tiny model (fast), and a whole run on it (slow).

No timing is asserted: the tiny random model says nothing about speed. The tests check that the table and the
JSON carry every column for the parent and both arms, and every target.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_specialists.py"
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
"""The bundled sample of the shared data (a clean clone has no ``../shared``)."""
COLUMNS = ("model", "gen", "params", "x parent", "layers", "vocab", "decode tok/s", "held-out nats/B", "vs unpruned",
           "probe nats/B", "cycle s", "status", "promoted", "loads fresh")
TARGETS = ("params <= 0.80x parent", "decode >= 1.25x parent", "held-out loss <= unpruned +2%", "promoted",
           "loads fresh", "cycle <= 2x unpruned")
MEASURED = ("params", "layers", "vocab", "decode_tokens_per_s", "decode_runs", "loss_per_byte", "loss_per_token")


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_specialists", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_printed(text: str) -> None:
    flat = " ".join(text.split())  # rich may wrap a header over two lines
    for column in COLUMNS:
        assert column in flat or all(word in flat for word in column.split()), f"column {column!r} missing:\n{text}"
    for model in ("parent", "unpruned", "pruned"):
        assert f"│ {model} " in text, f"no row for {model}:\n{text}"
    for target in TARGETS:
        assert target in text, f"target {target!r} missing:\n{text}"
    assert "PASS" in text or "FAIL" in text


def assert_result(result: dict) -> None:
    for model in ("parent", "unpruned", "pruned"):
        for key in MEASURED:
            assert key in result["measured"][model], f"{model} lacks {key}"
    for arm in ("unpruned", "pruned"):
        assert "loads_fresh" in result["measured"][arm]
    assert [t["target"] for t in result["targets"]] == list(TARGETS)


def test_split_keeps_a_fifth_out_and_names_the_domain() -> None:
    bench = load_bench()
    ingest, held_out = bench.split_rows("python_docs", 50, SAMPLE)
    assert (len(ingest), len(held_out)) == (40, 10)
    assert {r["domain"] for r in ingest + held_out} == {"python_docs"}  # the file says "python"
    assert not {r["id"] for r in ingest} & {r["id"] for r in held_out}
    assert bench.split_rows("python_docs", 50, SAMPLE) == (ingest, held_out)


def test_measures_and_prints_every_column(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny model stands for the parent and both generations (no cycle runs here)."""
    bench = load_bench()
    _, held_out = bench.split_rows("chemistry_elements", 20, SAMPLE)
    manifest = {"params": 1, "status": "promoted", "pruning": {"layers_removed": []}, "failed_gates": [],
                "candidate": {"foundation_probe_loss": 1.5}, "parent": {"foundation_probe_loss": 1.4}}
    arms = {arm: {"generation": 1, "path": str(tiny_model_dir), "parent_path": str(tiny_model_dir), "status": status,
                  "cycle_s": seconds, "cycle": {"status": status}, "step_s": {"train": 1.0}, "manifest": manifest}
            for arm, status, seconds in (("unpruned", "rejected", 10.0), ("pruned", "promoted", 12.0))}
    args = argparse.Namespace(prompts=2, new_tokens=4, timing_rounds=2, eval_fp32=False)
    result = {"rows": {"ingested": 16, "held_out": len(held_out)}, "arms": arms,
              "measured": bench.measure_domain(args, arms, held_out, 64)}
    result["targets"] = bench.check_targets(result)
    bench.print_domain("chemistry_elements", result)
    assert_printed(capsys.readouterr().out)
    assert_result(json.loads(json.dumps(result)))
    assert result["measured"]["pruned"]["loads_fresh"] is True
    assert {t["target"]: t["passed"] for t in result["targets"]}["params <= 0.80x parent"] is False  # same model


@pytest.mark.slow
def test_whole_run_on_the_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    """init, branch, ingest and a cycle per arm through the selftune CLI (a few minutes)."""
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--foundation", str(tiny_model_dir), "--data", str(SAMPLE),
         "--domains", "chemistry_elements", "--rows", "60",
         "--steps", "2", "--set", "pruning.heal_steps=2", "--timing-rounds", "2", "--workdir", str(tmp_path / "work"),
         "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_printed(done.stdout)
    result = json.loads(out.read_text())["domains"]["chemistry_elements"]
    assert_result(result)
    for arm in ("unpruned", "pruned"):
        assert result["arms"][arm]["cycle_s"] > 0 and result["arms"][arm]["generation"] is not None
