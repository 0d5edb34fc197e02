"""Stopping a cycle's worker is bounded by server.stop_timeout_seconds, even when its trainer does not stop.

(That the trainer itself stops promptly, within a Fisher estimate too, is tests/learners/test_learner_training.py's.)
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from selftune.daemon.context import Context
from selftune.daemon.cycle.control import start_cycle, worker_alive, worker_pid
from selftune.daemon.cycle.workdir import TRAINER_PID_FILE, WORKER_LOG_FILE, cycle_dir
from selftune.daemon.ingest import ingest
from selftune.policies.ingest import RowDefaults

from .conftest import process_alive

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "sample"
STOP_TIMEOUT = 4.0
ENV = {"SELFTUNE_SERVER__STOP_TIMEOUT_SECONDS": str(STOP_TIMEOUT), "SELFTUNE_REPLAY__REHEARSAL": "0",
       "SELFTUNE_TRAIN__THREADS": "1", "SELFTUNE_TRAIN__MAX_LENGTH": "96"}


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)


def test_a_stopped_worker_kills_a_trainer_that_does_not_stop_at_the_timeout(
        make_state: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)  # the worker process reads them
    context = Context.open(str(make_state()))
    with open(SAMPLES / "python_docs.jsonl", "rb") as stream:
        def add_batch(rows: list) -> object:
            with context.store.transaction(write=True) as tx:
                return tx.interactions.add_batch(rows)

        ingest(stream, add_batch, defaults=RowDefaults(branch="main"))
    cycle = start_cycle(context, "main", "test")
    directory = cycle_dir(context, cycle.id)
    worker, trainer = worker_pid(context, cycle.id), None
    try:
        _wait_for(lambda: (directory / TRAINER_PID_FILE).exists() or not worker_alive(context, cycle.id), 120,
                  "the trainer's start")
        trainer = int((directory / TRAINER_PID_FILE).read_text())
        # A trainer that cannot answer SIGTERM, as one deep in a stretch that does not look at the stop flag
        os.kill(trainer, signal.SIGSTOP)
        time.sleep(0.5)  # the worker watches it now
        os.kill(worker, signal.SIGTERM)
        asked = time.monotonic()
        _wait_for(lambda: not worker_alive(context, cycle.id), STOP_TIMEOUT + 10, "the worker's exit")
        took = time.monotonic() - asked
        trainer_left = process_alive(trainer)
    finally:  # whatever happened, leave no process behind
        for pid in (trainer, worker):
            if pid is not None and process_alive(pid):
                os.kill(pid, signal.SIGKILL)
    # the trainer gets three quarters of the timeout; the worker's own exit fits in the rest
    assert 0.75 * STOP_TIMEOUT <= took < STOP_TIMEOUT, took
    assert not trainer_left
    log = (directory / WORKER_LOG_FILE).read_text()
    assert f"(pid {trainer}) did not stop within {0.75 * STOP_TIMEOUT:g} s of SIGTERM: killed" in log, log[-2000:]
    with context.store.transaction() as tx:
        stopped = tx.cycles.get(cycle.id)
        steps = [(e.step, e.outcome) for e in tx.cycles.events(cycle.id)]
    assert stopped.outcome == "cancelled" and stopped.finished_at is not None, stopped
    assert steps[-1] == ("train", "cancelled"), steps
    context.store.engine.dispose()
