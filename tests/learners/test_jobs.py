"""The training job directory: write, read back, refuse a bad config or a missing job (no torch needed)."""

from __future__ import annotations

import subprocess
import sys
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
