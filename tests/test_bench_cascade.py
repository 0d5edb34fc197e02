"""bench/bench_cascade.py on the tiny model (fast): the held-out stream, the interleaved policies, the table, the targets.

No timing or loss is asserted: a random tiny model says nothing about either. The tests check that ingested prompts
never reach the stream, that each row goes where it should, and that every policy, column and target is printed.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_cascade.py"
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
"""The bundled sample of the shared data: chemistry_elements (rows of domain "chemistry") and python_docs."""
TARGETS = ("routing accuracy >= 95%", "auto loss <= oracle +2%", "auto >= 1.2x faster than generalist",
           "route p99 < 10 ms")


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cascade", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_cascade", module)
    spec.loader.exec_module(module)
    return module


def sample_prompts(domain: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in (SAMPLE / f"{domain}.jsonl").read_text().splitlines()]


def test_the_stream_leaves_out_what_the_state_ingested(tmp_path: Path) -> None:
    from selftune.daemon.context import Context
    from selftune.daemon.ingest import ingest

    bench = load_bench()
    context = Context.open(str(tmp_path / "state"))
    chemistry = (SAMPLE / "chemistry_elements.jsonl").read_text().splitlines()
    with context.store.transaction(write=True) as tx:
        if tx.branches.find("main") is None:
            tx.branches.create("main")
        ingest(io.BytesIO("\n".join(chemistry[:100]).encode()), tx.interactions.add_batch)
    ingested = bench.ingested_prompts(context)
    context.store.engine.dispose()
    assert ingested == {p.strip() for p in sample_prompts("chemistry_elements")[:100]}

    stream, counts = bench.build_stream(SAMPLE, ["chemistry_elements", "python_docs"], {"chem": ("chemistry",)},
                                        "main", ingested, per_domain=15)
    assert counts["chemistry_elements"] == {"rows": 120, "held_out": 20, "taken": 15, "expected": "chem",
                                            "specialist": True}
    assert counts["python_docs"]["expected"] == "main" and counts["python_docs"]["taken"] == 15
    assert len(stream) == 30 and not {r["prompt"].strip() for r in stream} & ingested
    assert {(r["domain"], r["expected"]) for r in stream} == {("chemistry_elements", "chem"), ("python_docs", "main")}
    again, _ = bench.build_stream(SAMPLE, ["chemistry_elements", "python_docs"], {"chem": ("chemistry",)}, "main",
                                  ingested, per_domain=15)
    assert again == stream  # a fixed shuffle


class FakeRouter:
    """Routes chemistry prompts to chem; defers one of them to main."""

    def choose(self, messages: list[dict[str, str]]):  # noqa: ANN201
        from selftune.daemon.service.models import Decision

        prompt = messages[-1]["content"]
        if "chemical" in prompt or "atomic" in prompt:
            deferred = ("chem@1",) if "atomic" in prompt else ()
            return Decision("main" if deferred else "chem", deferred_from=deferred, reason="chem scored",
                            details={"route_seconds": 0.001, "confidence": {"chem": -1.0}})
        return Decision("main", reason="no specialist in scope", details={"route_seconds": 0.002})


def test_policies_are_measured_printed_and_judged(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from selftune.daemon.service.pool import LoadedGeneration

    torch.set_num_threads(1)
    bench = load_bench()
    stream, _ = bench.build_stream(SAMPLE, ["chemistry_elements", "python_docs"], {"chem": ("chemistry",)}, "main",
                                   set(), per_domain=3)
    models = {"main": LoadedGeneration(0, tiny_model_dir), "chem": LoadedGeneration(1, tiny_model_dir)}
    records = bench.run_stream(FakeRouter(), models, "main", stream, new_tokens=2, max_length=128)
    assert len(records) == 6
    for rec in records:
        assert set(rec["seconds"]) == set(bench.POLICIES) and rec["branch"]["generalist"] == "main"
        assert rec["branch"]["oracle"] == rec["expected"] and rec["bytes"]["auto"] > 0
        assert rec["routed"] in ("chem", "main") and rec["route_s"] in (0.001, 0.002)
    summary = bench.summarise(records)
    assert summary["requests"] == 6 and 0 <= summary["routing_accuracy"] <= 1
    assert summary["route_ms"]["p99"] == pytest.approx(2.0, abs=0.01)
    targets = bench.check_targets(summary)
    assert [t["target"] for t in targets] == list(TARGETS)
    assert targets[3]["passed"]  # 2 ms < 10 ms
    bench.print_report(summary, targets, new_tokens=2)
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    for word in (*bench.POLICIES, "loss nats/B", "vs oracle", "mean ms", "median ms", "routing accuracy",
                 "routed right", "deferred", *TARGETS):
        assert word in flat, f"{word!r} missing:\n{text}"
    assert "PASS" in text or "FAIL" in text


def test_a_specialist_is_found_by_file_stem_or_row_domain() -> None:
    bench = load_bench()
    scopes = {"jargon": ("hacker_jargon",), "chem": ("chemistry",)}
    assert bench.owner("hacker_jargon", [{"domain": "x"}], scopes) == "jargon"
    assert bench.owner("chemistry_elements", [{"domain": "chemistry"}], scopes) == "chem"
    assert bench.owner("python_docs", [{"domain": "python"}], scopes) is None
