"""The training worker on the tiny Llama: replay share, EWC in the loop, kill -9 and SIGTERM resume, seeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selftune.learners import checkpoint, jobs
from selftune.learners.replay import farthest_first
from selftune.learners.strategy import Stopped
from selftune.learners.train import UNUSED_SOLVERS, run_job, skip_unused_solvers
from selftune.policies.training import EwcConfig, ReplayConfig, TrainConfig

TOPICS = ["gold", "silver", "neon", "argon", "kluge", "cruft", "bore", "abasement", "lambda", "tuple", "iterator", "yield"]
ROWS = [
    {"id": i, "prompt": f"Tell me about {t} ({k}).", "response": f"{t.capitalize()} is item {i} of the list, variant {k}."}
    for i, (t, k) in enumerate((t, k) for k in range(3) for t in TOPICS)
]
OLD_ROWS = [{"id": 1000 + r["id"], "prompt": r["prompt"].upper(), "response": r["response"].upper()} for r in ROWS]
FAST = TrainConfig(lora_rank=4, lora_alpha=8, steps=6, batch_size=4, max_length=64, threads=1, checkpoint_every=3)


def _adapter(workdir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(workdir / "adapter" / "adapter_model.safetensors"))


def _first_cycle(tmp: Path, model_dir: Path, replay: ReplayConfig, ewc: EwcConfig) -> Path:
    work = tmp / "cycle0"
    jobs.write_job(work, base_model=model_dir, train_rows=OLD_ROWS, experience=0, train=FAST, replay=replay, ewc=ewc)
    run_job(work)
    return work


def _second_cycle(tmp: Path, model_dir: Path, first: Path, train: TrainConfig, replay: ReplayConfig, ewc: EwcConfig,
                  fisher_in: Path | None = None) -> Path:
    """Experience 1 on ROWS, replaying what the first cycle's buffer kept."""
    work = tmp / "cycle1"
    jobs.write_job(
        work,
        base_model=model_dir,
        train_rows=ROWS,
        replay_rows=_replay_rows(jobs.read_result(first)),
        experience=1,
        train=train,
        replay=replay,
        ewc=ewc,
        fisher_in=fisher_in,
    )
    return work


def _replay_rows(result: dict) -> list[dict]:
    by_id = {r["id"]: r for r in OLD_ROWS + ROWS}
    return [{**by_id[m["id"]], "experience": m["experience"], "priority": m["priority"]} for m in result["replay_buffer"]]


def test_replay_honours_its_ratio_and_ewc_runs(tmp_path: Path, tiny_model_dir: Path) -> None:
    replay = ReplayConfig(buffer_size=10, ratio=0.25, selection="reservoir")
    ewc = EwcConfig(strength=1e3, fisher_examples=8, representation="rank1")
    first = _first_cycle(tmp_path, tiny_model_dir, replay, ewc)
    result0 = jobs.read_result(first)
    assert all(line["replayed"] == 0 for line in jobs.read_progress(first))  # empty buffer: all new
    assert len(result0["replay_buffer"]) == 10 and {m["experience"] for m in result0["replay_buffer"]} == {0}

    cfg = TrainConfig(**{**FAST.__dict__, "batch_size": 8, "steps": 5})
    work = _second_cycle(tmp_path, tiny_model_dir, first, cfg, replay, ewc, fisher_in=first / jobs.FISHER_FILE)
    result = run_job(work)
    progress = jobs.read_progress(work)
    assert [line["step"] for line in progress] == [1, 2, 3, 4, 5]
    assert all(line["replayed"] == 2 and line["sequences"] == 8 for line in progress)  # round(8 * 0.25)
    assert result["replayed_sequences"] == 10
    assert progress[0]["ewc_penalty"] == 0.0 and progress[-1]["ewc_penalty"] > 0  # grows as the adapter moves
    assert result["ewc_applied"] and result["fisher_meta"]["generations"] == 2
    members = result["replay_buffer"]
    assert len(members) == 10 and {m["experience"] for m in members} <= {0, 1}
    assert (work / "adapter" / "adapter_config.json").exists() and (work / jobs.FISHER_FILE).exists()


def test_rehearsal_rows_are_replayed_from_the_first_cycle_but_never_enter_the_buffer(tmp_path: Path, tiny_model_dir: Path) -> None:
    rehearsal = [{"id": f"foundation:{i}", "prompt": f"Say hello {i}.", "response": f"Hello {i}!"} for i in range(6)]
    cfg = TrainConfig(**{**FAST.__dict__, "batch_size": 4, "steps": 4})
    work = tmp_path / "cycle0"
    jobs.write_job(work, base_model=tiny_model_dir, train_rows=ROWS, rehearsal_rows=rehearsal, experience=0, train=cfg,
                   replay=ReplayConfig(buffer_size=10, ratio=0.25, rehearsal_ratio=0.25), ewc=EwcConfig(strength=1e3, fisher_examples=4))
    result = run_job(work)
    progress = jobs.read_progress(work)
    assert all(line["replayed"] == 1 for line in progress)  # empty buffer, yet round(4 * 0.25)
    assert result["rehearsal_examples"] == 6 and result["replayed_sequences"] == 4
    # no running Fisher handed in: EWC anchors on the rehearsal rows from the first cycle on
    assert result["ewc_anchor"] == "rehearsal" and progress[0]["ewc_penalty"] == 0.0 and progress[-1]["ewc_penalty"] > 0
    members = {m["id"] for m in result["replay_buffer"]}
    assert len(members) == 10 and members <= {r["id"] for r in ROWS}


def test_diversity_buffer_balances_experiences(tmp_path: Path, tiny_model_dir: Path) -> None:
    replay = ReplayConfig(buffer_size=8, ratio=0.5, selection="diversity")
    ewc = EwcConfig(strength=0.0, fisher_examples=0)
    first = _first_cycle(tmp_path, tiny_model_dir, replay, ewc)
    result0 = jobs.read_result(first)
    assert len(result0["replay_buffer"]) == 8 and result0["fisher"] is None
    work = _second_cycle(tmp_path, tiny_model_dir, first, FAST, replay, ewc)
    result = run_job(work)
    assert all(line["replayed"] == 2 for line in jobs.read_progress(work))
    per_experience = {e: sum(1 for m in result["replay_buffer"] if m["experience"] == e) for e in (0, 1)}
    assert per_experience == {0: 4, 1: 4}


def test_farthest_first_spreads_out() -> None:
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [0.0, 10.0], [0.05, 0.05]])
    order = farthest_first(points)
    assert sorted(order) == [0, 1, 2, 3, 4]
    assert set(order[1:3]) == {2, 3}  # the two far corners come right after the central pick


def test_same_seed_same_adapter_other_seed_other_adapter(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = TrainConfig(**{**FAST.__dict__, "lora_dropout": 0.1})
    off = (ReplayConfig(buffer_size=0), EwcConfig(fisher_examples=0))
    adapters = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        work = tmp_path / name
        jobs.write_job(work, base_model=tiny_model_dir, train_rows=ROWS, train=TrainConfig(**{**cfg.__dict__, "seed": seed}), replay=off[0], ewc=off[1])
        run_job(work)
        adapters.append(_adapter(work))
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    assert not all(torch.equal(adapters[0][k], adapters[2][k]) for k in adapters[0])


def _wait_for_step(work: Path, step: int, process: subprocess.Popen, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = jobs.read_progress(work)
        if lines and lines[-1]["step"] >= step:
            return lines[-1]["step"]
        if process.poll() is not None:
            pytest.fail(f"worker exited early ({process.returncode}): {(work / jobs.LOG_FILE).read_text()[-2000:]}")
        time.sleep(0.01)
    pytest.fail(f"worker did not reach step {step} in {timeout} s")


def test_kill_9_then_rerun_resumes_and_matches_an_uninterrupted_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Tolerance: the resumed adapter equals the uninterrupted one within 1e-6 (absolute); in practice it is
    bit-identical, since batches, learning rate, dropout RNG and optimizer state all resume exactly."""
    cfg = TrainConfig(**{**FAST.__dict__, "steps": 60, "checkpoint_every": 10, "lora_dropout": 0.1})
    kwargs = dict(base_model=tiny_model_dir, train_rows=ROWS, train=cfg, replay=ReplayConfig(buffer_size=0), ewc=EwcConfig(fisher_examples=4))

    reference = tmp_path / "uninterrupted"
    jobs.write_job(reference, **kwargs)
    run_job(reference)

    work = tmp_path / "killed"
    jobs.write_job(work, **kwargs)
    run = jobs.start_training(work)
    reached = _wait_for_step(work, 25, run.process)
    os.kill(run.pid, signal.SIGSTOP)  # freeze it mid-run, then kill -9: no chance to clean up
    assert jobs.read_result(work) is None
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait(30) == -signal.SIGKILL
    checkpoint_step = json.loads((work / "checkpoint" / "state.json").read_text())["step"]
    assert 20 <= checkpoint_step <= reached and checkpoint_step % 10 == 0

    result = run_job(work)  # the same command again (in-process here): resumes
    assert result["resumed_from_step"] == checkpoint_step and result["steps"] == 60
    assert result["steps_this_run"] == 60 - checkpoint_step
    assert [line["step"] for line in jobs.read_progress(work)] == list(range(1, 61))
    want, got = _adapter(reference), _adapter(work)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0.0, atol=1e-6)
    assert jobs.read_result(reference)["loss_last"] == result["loss_last"]


def test_sigterm_checkpoints_exits_143_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = TrainConfig(**{**FAST.__dict__, "steps": 100, "checkpoint_every": 0})
    work = tmp_path / "stopped"
    jobs.write_job(work, base_model=tiny_model_dir, train_rows=ROWS, train=cfg, replay=ReplayConfig(buffer_size=0), ewc=EwcConfig(fisher_examples=0))
    run = jobs.start_training(work)
    _wait_for_step(work, 3, run.process)
    assert run.stop(timeout=60) == jobs.EXIT_STOPPED
    state = json.loads((work / "checkpoint" / "state.json").read_text())
    assert 3 <= state["step"] < 100 and run.result() is None
    assert run.last_progress()["step"] == state["step"]  # checkpointed right after the step it was on
    result = run_job(work)
    assert result["resumed_from_step"] == state["step"] and result["steps"] == 100


def _wait_for_log(work: Path, text: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = (work / jobs.LOG_FILE).read_text(errors="replace")
        if text in log:
            return
        if process.poll() is not None:
            pytest.fail(f"worker exited early ({process.returncode}): {log[-2000:]}")
        time.sleep(0.01)
    pytest.fail(f"worker did not log {text!r} in {timeout} s")


MANY = [{"id": i, "prompt": f"Tell me about thing {i}.", "response": f"Thing {i} is number {i}."} for i in range(1000)]
SLOW_FISHER = EwcConfig(fisher_examples=len(MANY), fisher_batch_size=1)
"""A Fisher estimate of 5-15 s here (minutes with the real model): a stop must not wait for its end."""


def test_sigterm_during_the_final_fisher_estimate_stops_the_worker_within_seconds(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The estimate after training ends at its next batch; the checkpoint holds the last step (a rerun only redoes
    the finish), and the worker's exit skips the interpreter's seconds-long teardown."""
    cfg = TrainConfig(**{**FAST.__dict__, "steps": 2, "checkpoint_every": 0})
    work = tmp_path / "job"
    jobs.write_job(work, base_model=tiny_model_dir, train_rows=MANY, train=cfg, replay=ReplayConfig(buffer_size=0),
                   ewc=SLOW_FISHER)
    run = jobs.start_training(work)
    try:
        _wait_for_log(work, f"estimating the Fisher on {len(MANY)} examples", run.process)
        run.process.send_signal(signal.SIGTERM)
        asked = time.monotonic()
        assert run.wait(timeout=30) == jobs.EXIT_STOPPED
        assert time.monotonic() - asked < 2.5
    finally:
        run.process.kill()
    assert "stopped after training step 2" in (work / jobs.LOG_FILE).read_text()
    assert run.result() is None and not (work / jobs.FISHER_FILE).exists()
    assert json.loads((work / "checkpoint" / "state.json").read_text()) == {"step": 2, "steps": 2}


def test_a_stop_during_the_anchor_fisher_estimate_ends_it_at_its_first_batch(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Before training, a foundation parent's anchor is estimated on the rehearsal rows: a stop is seen there."""
    work = tmp_path / "job"
    jobs.write_job(work, base_model=tiny_model_dir, train_rows=ROWS, rehearsal_rows=MANY, train=FAST,
                   replay=ReplayConfig(buffer_size=0), ewc=SLOW_FISHER)
    asked: list[float] = []

    def stop_requested() -> bool:  # asked before the model load, after it, then (since the fix) at the first batch
        asked.append(time.monotonic())
        return len(asked) > 2

    with pytest.raises(Stopped, match="before training began"):
        run_job(work, stop_requested=stop_requested)
    assert len(asked) == 3 and asked[2] - asked[1] < 0.5  # not after the whole estimate
    assert jobs.read_progress(work) == [] and not (work / "checkpoint").exists()


def test_the_worker_skips_the_qp_backends_avalanche_never_uses() -> None:
    """Avalanche's GEM plugin (unused) imports qpsolvers, which loads jax (~150 MB) unless it is blocked; GEM's own
    solver, quadprog, still works."""
    def ours(name: str) -> bool:
        return name.split(".")[0] in ("qpsolvers", *UNUSED_SOLVERS)

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    try:
        for name in saved:
            del sys.modules[name]
        skip_unused_solvers()
        import qpsolvers  # afresh, as the worker's import of Avalanche does

        assert all(sys.modules[name] is None for name in UNUSED_SOLVERS)
        assert "quadprog" in qpsolvers.available_solvers and "jaxopt_osqp" not in qpsolvers.available_solvers
        x = qpsolvers.solve_qp(P=torch.eye(2).double().numpy(), q=-torch.ones(2).double().numpy(), solver="quadprog")
        assert x.tolist() == pytest.approx([1.0, 1.0])
    finally:
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.parametrize("asked_before", [1, 2, 3])  # stop asked for during the imports, the model load, the resume
def test_a_stop_during_setup_takes_no_step(tmp_path: Path, tiny_model_dir: Path, asked_before: int) -> None:
    work = tmp_path / "job"
    jobs.write_job(work, base_model=tiny_model_dir, train_rows=ROWS, train=FAST,
                   replay=ReplayConfig(buffer_size=0), ewc=EwcConfig(fisher_examples=0))
    asked = []

    def stop_requested() -> bool:
        asked.append(True)
        return len(asked) >= asked_before

    with pytest.raises(Stopped, match="before training began"):
        run_job(work, stop_requested=stop_requested)
    assert jobs.read_progress(work) == [] and not (work / "checkpoint").exists()
    result = run_job(work)  # the rerun starts afresh
    assert result["resumed_from_step"] is None and result["steps"] == FAST.steps


def test_a_changed_job_does_not_resume_a_stale_checkpoint(tmp_path: Path, tiny_model_dir: Path) -> None:
    work = tmp_path / "job"
    off = dict(replay=ReplayConfig(buffer_size=0), ewc=EwcConfig(fisher_examples=0))
    jobs.write_job(work, base_model=tiny_model_dir, train_rows=ROWS, train=FAST, **off)
    run_job(work)
    (work / jobs.RESULT_FILE).unlink()
    jobs.write_job(work, base_model=tiny_model_dir, train_rows=ROWS[:5], train=FAST, **off)
    with pytest.raises(ValueError, match="belongs to another job"):
        run_job(work)


def test_checkpoint_round_trip_restores_tensors_optimizer_rng_history_and_progress(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text("{}\n")
    fisher = tmp_path / "fisher.safetensors"
    fisher.write_bytes(b"f")
    names = (jobs.JOB_FILE, "data.jsonl")
    fingerprint = checkpoint.fingerprint(tmp_path, names, stamped=[fisher])
    assert fingerprint == checkpoint.fingerprint(tmp_path, names, stamped=[fisher])
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.grad = torch.ones(3)
    optimizer.step()
    history = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    for record in history:
        checkpoint.append_progress(tmp_path, record)
    checkpoint.save(tmp_path, 2, 3, [("w", weight)], optimizer, history[:2], fingerprint)
    rng = torch.get_rng_state()
    torch.rand(5)  # moves the RNG on: resume puts it back

    fresh = torch.nn.Parameter(torch.zeros(3))
    fresh_optimizer = torch.optim.AdamW([fresh], lr=0.1)
    restored: list[dict] = []
    assert checkpoint.resume(tmp_path, fingerprint, [("w", fresh)], fresh_optimizer, restored) == 2
    assert torch.equal(fresh.detach(), weight.detach()) and restored == history[:2]
    moments = [o.state_dict()["state"][0]["exp_avg"] for o in (optimizer, fresh_optimizer)]
    assert torch.equal(*moments)
    assert torch.equal(torch.get_rng_state(), rng) and jobs.read_progress(tmp_path) == history[:2]
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text()) == {"step": 2, "steps": 3}

    (tmp_path / "data.jsonl").write_text("{}\n{}\n")  # the job's data changed: its checkpoint is stale
    changed = checkpoint.fingerprint(tmp_path, names, stamped=[fisher])
    with pytest.raises(ValueError, match=r"belongs to another heal job .*delete .*checkpoint to start this heal job"):
        checkpoint.resume(tmp_path, changed, [("w", fresh)], fresh_optimizer, [], kind="heal job")
    fisher.write_bytes(b"ff")  # a stamped file counts by size and mtime
    assert checkpoint.fingerprint(tmp_path, names, stamped=[fisher]) != changed
