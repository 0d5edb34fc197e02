"""The training job directory: write, read back, refuse a bad config or a missing job (no torch needed)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from selftune.learners import jobs
from selftune.policies.errors import ConfigError
from selftune.policies.training import ReplayConfig, TrainConfig


def test_job_directory_round_trip(tmp_path: Path) -> None:
    rows = [{"id": 1, "prompt": "p", "response": "r"}]
    jobs.write_job(tmp_path, base_model="/models/parent", train_rows=rows, experience=3, train=TrainConfig(steps=9))
    job = jobs.read_job(tmp_path)
    assert job.experience == 3 and job.train.steps == 9 and job.base_model == "/models/parent"
    assert (tmp_path / jobs.TRAIN_FILE).read_text().count("\n") == 1
    with pytest.raises(ConfigError):
        jobs.write_job(tmp_path / "bad", base_model="/m", train_rows=rows, replay=ReplayConfig(ratio=2.0))
    with pytest.raises(FileNotFoundError, match="write_job"):
        jobs.start_training(tmp_path / "missing")


def test_the_daemon_side_imports_neither_torch_nor_avalanche() -> None:
    code = "import sys, selftune.learners.jobs; print(sorted(m for m in ('torch', 'avalanche') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class _Stop(Exception):
    pass


@pytest.mark.parametrize("outcome", ["done", "stopped", "failed"])
def test_worker_main_maps_the_outcome_to_an_exit_status(tmp_path: Path, outcome: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    def run(workdir: Path, stop_requested: Callable[[], bool]) -> dict:
        assert workdir == tmp_path and stop_requested() is False
        if outcome == "stopped":
            raise _Stop("stopped at step 3; rerun the job to resume")
        if outcome == "failed":
            raise RuntimeError("boom")
        return {"steps": 5, "loss_last": 0.5, "other": 1}

    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = jobs.worker_main([str(tmp_path)], "selftune.learners.fake", run, stopped=lambda: _Stop,
                                summary=("steps", "loss_last"), failure=lambda error: {"extra": str(error)})
    finally:
        signal.signal(signal.SIGTERM, previous)
    out, err = capsys.readouterr()
    if outcome == "done":
        assert code == 0 and json.loads(out) == {"steps": 5, "loss_last": 0.5}
    elif outcome == "stopped":
        assert code == jobs.EXIT_STOPPED and "rerun the job" in err and jobs.read_failure(tmp_path) is None
    else:
        failure = jobs.read_failure(tmp_path)
        assert code == 1 and failure is not None
        assert failure["error"] == "RuntimeError: boom" and failure["extra"] == "boom"
        assert "Traceback" in failure["traceback"]
    assert jobs.worker_main([], "selftune.learners.fake", run, stopped=lambda: _Stop, summary=()) == 2
    assert "usage: python -m selftune.learners.fake WORKDIR" in capsys.readouterr().err
