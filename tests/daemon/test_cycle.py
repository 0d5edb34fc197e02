"""Cycles end to end with a tiny model: the real CLI, worker process, database and generation directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selftune.daemon.context import Context

SELFTUNE = str(Path(sys.executable).with_name("selftune"))
SAMPLES = Path(__file__).resolve().parents[2] / "data" / "sample"
FAST = {  # small and quick
    "SELFTUNE_REPLAY__REHEARSAL": "0",  # the untrained tiny model ends no answer: no rehearsal row would be kept
    "SELFTUNE_TRAIN__STEPS": "12", "SELFTUNE_TRAIN__BATCH_SIZE": "4", "SELFTUNE_TRAIN__MAX_LENGTH": "96",
    "SELFTUNE_TRAIN__LEARNING_RATE": "0.02", "SELFTUNE_TRAIN__THREADS": "1", "SELFTUNE_CYCLE__MAX_EVAL_ROWS": "16",
    "SELFTUNE_CYCLE__SAMPLE_ANSWERS": "2", "SELFTUNE_EWC__FISHER_EXAMPLES": "8",
    # An untrained tiny model only moves its loss by ~1% in 12 LoRA steps, and its decode speed is noise:
    # these two gates are exercised at their real thresholds with the real model (the slow tests).
    "SELFTUNE_GATES__MIN_NEW_DATA_IMPROVEMENT": "0.002", "SELFTUNE_GATES__MIN_DECODE_SPEED_RATIO": "0.0",
}


def selftune(state: Path, *args: str, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([SELFTUNE, "--state", str(state), *args], capture_output=True, text=True,
                            env={**os.environ, **FAST, **(env or {})}, timeout=600)
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def cycle(state: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    return json.loads(selftune(state, "cycle", "--wait", "--json", *args, env=env).stdout)


def generation_dirs(state: Path) -> list[Path]:
    return [p for p in (state / "generations").iterdir() if not p.name.startswith(".tmp-")]


def assert_every_visible_generation_is_complete(state: Path) -> None:
    context = Context.open(str(state))
    for directory in generation_dirs(state):
        context.artifacts.verify(int(directory.name))  # raises on a missing manifest or a bad checksum


@pytest.fixture()
def state(tmp_path: Path, tiny_model_dir: Path) -> Path:
    state = tmp_path / "state"
    selftune(state, "init", "--foundation", str(tiny_model_dir))
    selftune(state, "ingest", str(SAMPLES / "python_docs.jsonl"))
    return state


def test_a_cycle_makes_a_promoted_generation(state: Path, tmp_path: Path) -> None:
    # three reworded twins of logged rows: selection keeps one row of each pair (the earlier one)
    rows = [json.loads(line) for line in (SAMPLES / "python_docs.jsonl").read_text().splitlines()[3:6]]
    twins = [{**r, "prompt": r["prompt"].replace("what is meant by", "what's meant by")} for r in rows]
    assert all(t["prompt"] != r["prompt"] for t, r in zip(twins, rows))
    (tmp_path / "twins.jsonl").write_text("".join(json.dumps(t) + "\n" for t in twins))
    selftune(state, "ingest", str(tmp_path / "twins.jsonl"))
    # The tiny model's random input embeddings put such twins at 0.98-0.99 (distinct sample rows at most 0.91);
    # the default 0.99 is measured on the real foundation's.
    result = cycle(state, env={"SELFTUNE_SELECTION__NEAR_DUPLICATE_SIMILARITY": "0.98"})
    assert result["status"] == "promoted", result
    selected = json.loads((state / "cycles" / str(result["cycle"]) / "select.json").read_text())
    assert selected["counts"]["excluded_near_duplicate"] == 3
    assert {int(k): v for k, v in selected["near_duplicates"].items()} == {241: 4, 242: 5, 243: 6}
    assert "near duplicate (3 excluded)" in (state / "generations" / "1" / "report.md").read_text()
    assert result["generation"] == 1
    names = {g["name"] for g in result["gates"]}
    assert {"new_data_improvement", "params_ratio"} <= names, names
    assert all({"name", "passed", "value", "threshold"} <= set(g) for g in result["gates"])
    manifest = json.loads((state / "generations" / "1" / "generation.json").read_text())
    assert manifest["parent"] == 0 and manifest["branch"] == "main" and manifest["cycle"] == result["cycle"]
    assert set(manifest["training"]) >= {"steps", "learning_rate", "lora_rank", "batch_size", "tokens",
                                         "replay_ratio", "ewc_lambda"}
    assert manifest["training"]["steps"] == 12 and manifest["training"]["tokens"] > 0
    assert manifest["training"]["threads"] == 1  # train.threads = 1 (FAST): the trainer ran with what was decided
    resources = manifest["resources"]  # peak resident memory of the trainer and of the evaluating worker, MiB
    assert resources["train_peak_rss_mb"] > 10 and resources["evaluate_peak_rss_mb"] > 10, resources
    for suite in (manifest["metrics"]["candidate"], manifest["metrics"]["parent"]):  # per byte, per token beside
        assert suite["loss_unit"] == "nats/byte" and suite["per_token_unit"] == "nats/token"
        assert suite["new_data_loss_per_token"] > suite["new_data_loss"] > 0  # a token holds more than one byte
    for name in ("model.safetensors", "config.json", "adapter", "fisher.safetensors", "report.md", "README.md"):
        assert (state / "generations" / "1" / name).exists(), name
    work = state / "cycles" / str(result["cycle"])  # records stay; intermediate models are dropped
    assert (work / "gate.json").exists() and (work / "train" / "adapter").exists()
    assert not (work / "merged").exists() and not (work / "train" / "checkpoint").exists()
    assert "it/s]" not in (work / "worker.log").read_text()  # no transformers progress bars in the worker's log
    assert "1 torch thread(s) (train.threads = 1" in (work / "worker.log").read_text()  # the decision, logged
    generations = json.loads(selftune(state, "generations", "--json").stdout)
    assert [(g["id"], g["status"], g["aliases"]) for g in generations] == [(0, "promoted", []), (1, "promoted", ["champion"])]
    # nothing new to learn: the next cycle is skipped, and the champion stays
    again = cycle(state)
    assert again["status"] == "skipped" and again["generation"] is None


def test_a_probe_recorded_per_token_is_read_per_byte_and_rewritten_with_its_unit(state: Path) -> None:
    from selftune.daemon.cycle import probes
    from selftune.learners import evaluate as ev

    context = Context.open(str(state))
    rows = [{"prompt": "What is a list?", "answer": "A mutable sequence — of items."},
            {"prompt": "Greet me.", "answer": "Hello, wörld! 👋"}]
    conversations = [probes._conversation(r) for r in rows]
    measured = ev.held_out_loss(*ev.load_model(context.artifacts.path(0)), conversations, autocast=False)
    old = {"generation": 0, "rows": rows, "loss": measured.loss_per_token}  # as written before: per token, no unit
    (state / probes.PROBE_FILE).write_text(json.dumps(old))
    assert probes.foundation_probe_loss(context) == pytest.approx(measured.loss, rel=1e-9)  # what a fresh measure gives
    record = json.loads((state / probes.PROBE_FILE).read_text())
    assert record["unit"] == "nats/byte" and record["loss"] == pytest.approx(measured.loss, rel=1e-9)
    assert (record["loss_per_token"], record["tokens"], record["bytes"]) == (measured.loss_per_token, measured.tokens,
                                                                             measured.bytes)
    assert probes.foundation_probe(context) == conversations  # the probe's rows stay the same


def test_a_pruned_generation_is_healed_smaller_and_loads_in_a_fresh_process(state: Path) -> None:
    pruned = {"SELFTUNE_PRUNING__ENABLED": "true", "SELFTUNE_PRUNING__MLP_CHANNEL_FRACTION": "0.5",
              "SELFTUNE_PRUNING__HEAL_STEPS": "4"}
    result = cycle(state, env=pruned)
    assert result["status"] in ("promoted", "rejected") and result["generation"] == 1, result
    directory = state / "generations" / "1"
    manifest = json.loads((directory / "generation.json").read_text())
    pruning = manifest["pruning"]
    assert pruning["params_after"] < pruning["params_before"] and pruning["intermediate_size_after"] < pruning["intermediate_size_before"]
    assert pruning["heal"]["enabled"] and pruning["heal"]["steps"] == 4 and pruning["heal"]["tokens"] > 0
    assert not (directory / "fisher.safetensors").exists()  # its shapes are the parent's: not carried across pruning
    load = ("import sys; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); print(sum(p.numel() for p in m.parameters()))")
    fresh = subprocess.run([sys.executable, "-c", load, str(directory)], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    assert int(fresh.stdout.split()[-1]) == manifest["params"] == pruning["params_after"]
    work = state / "cycles" / str(result["cycle"])
    assert not (work / "pruned").exists() and not (work / "healed").exists() and (work / "heal.json").exists()


def crash_at(state: Path, step: str, env: dict[str, str] | None = None) -> int:
    """Start a cycle whose worker kills itself (SIGKILL) as ``step`` begins; wait until it is dead."""
    from selftune.daemon.cycle.control import worker_alive

    started = json.loads(selftune(state, "cycle", "--json", env={**(env or {}), "SELFTUNE_CRASH_AT": step}).stdout)
    context = Context.open(str(state))
    deadline = time.time() + 300
    while worker_alive(context, started["cycle"]) and time.time() < deadline:
        time.sleep(0.3)
    return started["cycle"]


def test_nan_in_the_adapter_is_rejected_and_the_champion_stays(state: Path) -> None:
    from safetensors.torch import load_file, save_file

    cycle_id = crash_at(state, "merge")
    adapter = state / "cycles" / str(cycle_id) / "train" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(adapter)
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, adapter)
    result = cycle(state)
    assert result["cycle"] == cycle_id and result["status"] == "rejected" and result["generation"] is None, result
    (gate,) = result["gates"]
    assert gate["name"] == "finite_weights" and not gate["passed"] and "NaN" in gate["reason"], gate
    generations = json.loads(selftune(state, "generations", "--json").stdout)
    assert [(g["id"], g["aliases"]) for g in generations] == [(0, ["champion"])]
    assert generation_dirs(state) == [state / "generations" / "0"]


@pytest.mark.parametrize("step", ["train", *(pytest.param(s, marks=pytest.mark.slow) for s in
                                          ("select", "replay", "merge", "prune", "heal", "evaluate", "gate", "package", "promote"))])
def test_kill_9_at_a_step_then_the_cycle_resumes(state: Path, step: str) -> None:
    cycle_id = crash_at(state, step)
    context = Context.open(str(state))
    with context.store.transaction() as tx:
        crashed = tx.cycles.get(cycle_id)
    assert crashed.finished_at is None and crashed.state == step
    assert_every_visible_generation_is_complete(state)
    resumed = cycle(state)
    assert resumed["cycle"] == cycle_id and resumed["status"] in ("promoted", "rejected"), resumed
    assert_every_visible_generation_is_complete(state)
    with context.store.transaction() as tx:
        outcomes = [e.outcome for e in tx.cycles.events(cycle_id) if e.step == step]
    assert outcomes[:2] == ["interrupted", "ok"], outcomes


def test_a_branch_specialises_without_touching_main(state: Path) -> None:
    assert cycle(state)["status"] == "promoted"
    selftune(state, "branch", "create", "chem", "--from", "1", "--domain", "chemistry")
    counts = json.loads(selftune(state, "ingest", str(SAMPLES / "chemistry_elements.jsonl"), "--json").stdout)
    assert counts["accepted"] > 0
    # This test is about the lineage, not learning: the untrained tiny model need not improve on chemistry.
    result = cycle(state, "--branch", "chem", env={"SELFTUNE_GATES__MIN_NEW_DATA_IMPROVEMENT": "-1"})
    assert result["status"] == "promoted", result
    generations = {g["id"]: g for g in json.loads(selftune(state, "generations", "--json").stdout)}
    assert generations[result["generation"]]["branch"] == "chem" and generations[result["generation"]]["parent"] == 1
    # A specialist prunes by default: its vocabulary first, then layers stepwise (the tiny model's two layers
    # are both edge layers, so none goes); the heal (LoRA) runs on what is left, and the prune-cost gate
    # compares it with the unpruned candidate.
    manifest = json.loads((state / "generations" / str(result["generation"]) / "generation.json").read_text())
    pruning = manifest["pruning"]
    assert pruning["enabled"] and pruning["layer_dropping"] == "stepwise" and pruning["layers_removed"] == []
    assert pruning["vocab"]["enabled"] and pruning["vocab"]["vocab_size_after"] < pruning["vocab"]["vocab_size_before"]
    assert manifest["params"] == pruning["params_after"] < pruning["params_before"] == manifest["metrics"]["unpruned"]["params"]
    assert pruning["heal"]["enabled"] and pruning["heal"]["kind"] == "lora"
    prune_cost = next(g for g in manifest["gates"] if g["name"] == "prune_cost")
    assert prune_cost["threshold"] == 0.02 and prune_cost["passed"], prune_cost
    assert generations[1]["aliases"] == ["champion"]  # main's; chem's champion moved on
    tree = selftune(state, "generations", "--tree").stdout
    assert "chem" in tree and "main" in tree
    selftune(state, "rollback", "chem")
    branches = {b["name"]: b for b in json.loads(selftune(state, "branch", "list", "--json").stdout)}
    assert branches["chem"]["champion"] == 1 and branches["main"]["champion"] == 1



def test_a_cancelled_cycle_ends_cancelled_and_so_does_its_step(state: Path) -> None:
    from selftune.daemon.cycle.control import cancel_cycle, worker_alive

    long = {"SELFTUNE_TRAIN__STEPS": "5000"}  # still training when the cancel comes
    cycle_id = json.loads(selftune(state, "cycle", "--json", env=long).stdout)["cycle"]
    context = Context.open(str(state))
    progress = state / "cycles" / str(cycle_id) / "train" / "progress.jsonl"
    deadline = time.time() + 300
    while not (progress.exists() and progress.read_text()):  # a training step has been taken
        assert time.time() < deadline, "the cycle never started training"
        time.sleep(0.3)
    cancel_cycle(context, cycle_id)
    while worker_alive(context, cycle_id) and time.time() < deadline + 120:
        time.sleep(0.3)
    with context.store.transaction() as tx:
        cancelled = tx.cycles.get(cycle_id)
        steps = [(e.step, e.outcome) for e in tx.cycles.events(cycle_id)]
    assert cancelled.outcome == "cancelled" and cancelled.finished_at is not None, cancelled
    assert steps[-1] == ("train", "cancelled"), steps
    assert all(outcome != "running" for _, outcome in steps), steps


def test_cancelling_a_cycle_whose_worker_died_closes_the_step_it_was_in(state: Path) -> None:
    from selftune.daemon.cycle.control import cancel_cycle

    cycle_id = crash_at(state, "train")
    context = Context.open(str(state))
    cancel_cycle(context, cycle_id)  # no worker to signal: the cycle is closed at once
    with context.store.transaction() as tx:
        cancelled = tx.cycles.get(cycle_id)
        steps = [(e.step, e.outcome) for e in tx.cycles.events(cycle_id)]
    assert cancelled.outcome == "cancelled" and cancelled.finished_at is not None, cancelled
    assert steps[-1] == ("train", "interrupted"), steps  # by the crash; no step is left "running"
