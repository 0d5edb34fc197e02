"""Starting, watching, cancelling and resuming cycles. A cycle runs in a worker process of its own.

One cycle at a time per state directory: a file lock makes "is one running? then start" atomic
across the service, the CLI and API requests. The worker runs ``selftune.daemon.cycle.recipe`` under a
lower priority; the cycle's row and its step events in the database are the truth about it.
Light on purpose (no torch): the API process and the CLI import it.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from selftune.policies.errors import ConflictError, NotFoundError
from selftune.policies.records import CHAMPION, Cycle
from selftune.storage.contracts import UnitOfWork

from selftune.daemon.context import Context
from selftune.daemon.cycle.workdir import WORKER_LOG_FILE, WORKER_PID_FILE, cycle_dir

FIRST_STEP = "select"
LOCK_FILE = "cycle.lock"
"""In the state directory: held while checking for a running cycle and starting one."""
SERVICE_LOCK_FILE = "serve.lock"
"""In the state directory: held by ``selftune serve`` while it runs (the kernel drops it when the process ends)."""


@contextmanager
def _cycle_lock(context: Context) -> Iterator[None]:
    context.make_state_dir()
    with open(context.state / LOCK_FILE, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@contextmanager
def service_lock(context: Context) -> Iterator[None]:
    """Held (shared) for as long as a service runs on the state, so that a cycle's worker can tell."""
    context.make_state_dir()
    with open(context.state / SERVICE_LOCK_FILE, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH)  # waits only while a worker is looking (``service_running``)
        yield


def service_running(context: Context) -> bool:
    """Whether a ``selftune serve`` runs on the state right now (a cycle then leaves it a core: ``cycle_threads``)."""
    try:
        with open(context.state / SERVICE_LOCK_FILE) as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released as the file closes
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def running_cycle(context: Context) -> Cycle | None:
    """The unfinished cycle, if any (there is at most one)."""
    with context.store.transaction() as tx:
        unfinished = tx.cycles.list(unfinished_only=True)
    return unfinished[0] if unfinished else None


def start_cycle(context: Context, branch: str, trigger: str) -> Cycle:
    """Create a cycle of ``branch`` on its champion and start its worker; returns at once.

    ``ConflictError`` if a cycle is already running (it names that cycle).
    """
    with _cycle_lock(context):
        if (current := running_cycle(context)) is not None:
            raise ConflictError(f"cycle {current.id} of branch {current.branch!r} is still running "
                                f"(step {current.state}): wait for it, or cancel it first")
        with context.store.transaction(write=True) as tx:
            tx.branches.get(branch)
            champion = tx.aliases.get(branch, CHAMPION)
            if champion is None:
                raise NotFoundError(f"branch {branch!r} has no champion: run `selftune init` first")
            cycle = tx.cycles.create(branch, FIRST_STEP, parent_generation_id=champion.generation_id)
            tx.cycles.add_event(cycle.id, "created", "ok", detail={"trigger": trigger})
        _spawn_worker(context, cycle.id)
    return cycle


def resume_cycles(context: Context) -> list[int]:
    """Restart the worker of an unfinished cycle whose worker is gone (after a crash or a reboot)."""
    resumed = []
    with _cycle_lock(context):
        cycle = running_cycle(context)
        if cycle is not None and not worker_alive(context, cycle.id):
            _spawn_worker(context, cycle.id)
            resumed.append(cycle.id)
    return resumed


def cancel_cycle(context: Context, cycle_id: int) -> Cycle:
    """Ask the cycle's worker to stop (SIGTERM): it checkpoints training and records the step it was in and
    the cycle as "cancelled". Returns the cycle as it is now (still unfinished while its worker stops)."""
    with context.store.transaction() as tx:
        cycle = tx.cycles.get(cycle_id)
    if cycle.finished_at is not None:
        raise ConflictError(f"cycle {cycle_id} has finished already ({cycle.outcome}): nothing to cancel")
    pid = worker_pid(context, cycle_id)
    if pid is not None and worker_alive(context, cycle_id):
        os.kill(pid, signal.SIGTERM)
    else:  # no worker: nothing can be mid-write, so the cycle can be closed here
        with context.store.transaction(write=True) as tx:
            close_running_steps(tx, cycle_id, "interrupted")  # by the crash that took its worker
            cycle = tx.cycles.finish(cycle_id, "cancelled", "cancelled while no worker was running")
    return cycle


def close_running_steps(tx: UnitOfWork, cycle_id: int, outcome: str) -> None:
    """Inside a write transaction: close the cycle's step records still marked "running" with ``outcome``."""
    for event in tx.cycles.events(cycle_id):
        if event.outcome == "running":
            tx.cycles.finish_event(event.id, outcome)


def worker_pid(context: Context, cycle_id: int) -> int | None:
    try:
        return int((cycle_dir(context, cycle_id) / WORKER_PID_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None


def worker_alive(context: Context, cycle_id: int) -> bool:
    pid = worker_pid(context, cycle_id)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own exited child) is not alive; reap it
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def _spawn_worker(context: Context, cycle_id: int) -> None:
    directory = cycle_dir(context, cycle_id)
    directory.mkdir(parents=True, exist_ok=True)
    nice = context.config.cycle.nice
    command = [sys.executable, "-m", "selftune.daemon.cycle.worker", "--state", str(context.state),
               "--config", str(context.config_file), str(cycle_id)]
    with open(directory / WORKER_LOG_FILE, "ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=lambda: os.nice(nice))  # noqa: PLW1509
    (directory / WORKER_PID_FILE).write_text(str(process.pid))
