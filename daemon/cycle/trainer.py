"""A cycle's training and heal jobs: child processes the worker starts (or resumes), watches and stops.

A stopped worker (``Cancelled``) asks its trainer to checkpoint and exit, and kills it after
``trainer_stop_timeout``, so that the worker's own exit still fits in ``server.stop_timeout_seconds``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selftune.learners import heal as distill
from selftune.learners import jobs
from selftune.learners.merge import NonFiniteWeightsError
from selftune.policies.config import Config
from selftune.policies.gates import GateResult

from selftune.daemon.cycle.workdir import PROGRESS_FILE, TRAINER_PID_FILE, Work

log = logging.getLogger(__name__)


class Cancelled(BaseException):
    """Raised in the worker by SIGTERM (a BaseException, so no step swallows it).

    The step it stops is recorded "cancelled", and so is the cycle (by the worker)."""


class Rejected(Exception):
    """The candidate cannot become a generation (e.g. non-finite weights); the reason is its failed gate."""

    def __init__(self, gate: GateResult) -> None:
        super().__init__(gate.reason)
        self.gate = gate


def run_job(work: Work, workdir: Path, total_steps: int,
                  start: Callable[[Path], jobs.TrainingRun] = jobs.start_training) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Start (or resume) the job in ``workdir`` as a child process (a training job, or what ``start`` starts:
    the heal) and watch it to the end. A job whose weights went non-finite rejects the candidate. Cancelled, the
    job checkpoints and exits, or is killed (and logged) after ``trainer_stop_timeout``."""
    run = start(workdir)
    try:
        work.path(TRAINER_PID_FILE).write_text(str(run.pid))
        while run.poll() is None:
            _report_progress(work, run.last_progress(), total_steps)
            time.sleep(1.0)
    except Cancelled:
        run.stop(timeout=trainer_stop_timeout(work.config))  # a later resume goes on from its checkpoint
        raise
    result = run.result()
    if run.poll() != 0 or result is None:
        failure = distill.heal_failure(workdir)
        if isinstance(failure, NonFiniteWeightsError):
            raise Rejected(GateResult("finite_weights", False, None, None, None, f"{workdir.name}: {failure}")) from failure
        detail = (run.failure() or {}).get("error") or f"exited with status {run.poll()}; see {workdir / jobs.LOG_FILE}"
        raise RuntimeError(f"{workdir.name} job failed: {detail}")
    curves = {key: [p.get(key) for p in run.progress()] for key in ("step", "loss", "ewc_penalty", "tokens_per_s", "lr", "replayed", "sequences")}
    return result, curves


def trainer_stop_timeout(config: Config) -> float:
    """How long a cancelled worker waits for its trainer before killing it: three quarters of
    ``server.stop_timeout_seconds``, so that the worker's own exit (records closed, connections disposed) still
    ends within it."""
    return 0.75 * config.server.stop_timeout_seconds


def stop_orphan_trainer(work: Work) -> None:
    """A trainer left running by a killed worker is stopped (it checkpoints) before the step starts again; killed
    if it is still there after ``server.stop_timeout_seconds``."""
    try:
        pid = int(work.path(TRAINER_PID_FILE).read_text())
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return
    deadline = time.monotonic() + work.config.server.stop_timeout_seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    log.warning("the trainer left running (pid %s) did not stop within server.stop_timeout_seconds: killed", pid)
    with contextlib.suppress(ProcessLookupError):  # it may have exited just now
        os.kill(pid, signal.SIGKILL)


def _report_progress(work: Work, last: dict[str, Any] | None, total_steps: int) -> None:
    if last is not None:
        work.write(PROGRESS_FILE, {**last, "total_steps": total_steps})
