"""The training job as a working directory, and a handle to run it in a child process.

Light on purpose (stdlib and ``policies`` only; no torch): the daemon imports this to write a job, start
the worker, read its progress and stop it. The worker is ``python -m selftune.learners.train WORKDIR``.

A working directory holds:

* ``job.json`` (in): base model directory, experience number, the train/replay/ewc configs, the running
  Fisher of earlier generations (optional), and the names of the data files below.
* ``train.jsonl`` / ``replay.jsonl`` (in): rows ``{"id", "messages": [{"role", "content"}], "experience",
  "priority"}`` (``prompt``/``response`` rows work too); replay rows are the buffer's current members.
* ``rehearsal.jsonl`` (in, optional): rows replayed like the buffer's but never stored in it (the daemon's
  foundation rehearsal).
* ``progress.jsonl`` (out): one line per step (step, loss, ewc_penalty, tokens, tokens_per_s, lr, ...).
* ``checkpoint/state.pt`` (out): adapter, optimizer, RNG, step, written atomically every
  ``checkpoint_every`` steps and on SIGTERM (``learners.checkpoint``). Rerunning the command resumes from it.
* ``adapter/``, ``fisher.safetensors``, ``result.json`` (out, at the end); ``failed.json`` if it failed.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from selftune.policies.records import Interaction
from selftune.policies.training import EwcConfig, ReplayConfig, TrainConfig, check, from_dict, to_dict

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
TRAIN_FILE = "train.jsonl"
REPLAY_FILE = "replay.jsonl"
REHEARSAL_FILE = "rehearsal.jsonl"
PROGRESS_FILE = "progress.jsonl"
RESULT_FILE = "result.json"
FAILED_FILE = "failed.json"
CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"
FISHER_FILE = "fisher.safetensors"
LOG_FILE = "train.log"
EXIT_STOPPED = 143
"""Exit status of a worker stopped by SIGTERM after writing its checkpoint (128 + SIGTERM): resumable."""


@dataclass(frozen=True)
class Job:
    base_model: str
    """The parent generation: a transformers causal-LM directory (with its tokenizer)."""
    experience: int = 0
    """This cycle's experience number (replay groups and buffer membership are keyed by it)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    ewc: EwcConfig = field(default_factory=EwcConfig)
    fisher_in: str | None = None
    """The running Fisher of earlier generations (``fisher.safetensors`` of the parent), or None."""
    train_file: str = TRAIN_FILE
    replay_file: str = REPLAY_FILE
    rehearsal_file: str = REHEARSAL_FILE


def interaction_row(interaction: Interaction, experience: int = 0, priority: float = 0.0) -> dict[str, Any]:
    """A plain row from a stored interaction (the learner never sees the database)."""
    return {
        "id": interaction.id,
        "messages": [m.as_dict() for m in interaction.messages],
        "experience": experience,
        "priority": priority,
    }


def write_job(
    workdir: str | Path,
    *,
    base_model: str | Path,
    train_rows: Iterable[dict[str, Any] | Interaction],
    replay_rows: Iterable[dict[str, Any] | Interaction] = (),
    rehearsal_rows: Iterable[dict[str, Any]] = (),
    experience: int = 0,
    train: TrainConfig | None = None,
    replay: ReplayConfig | None = None,
    ewc: EwcConfig | None = None,
    fisher_in: str | Path | None = None,
) -> Path:
    """Create a job directory (configs checked first: one error listing every problem)."""
    job = Job(
        base_model=str(base_model),
        experience=experience,
        train=train or TrainConfig(),
        replay=replay or ReplayConfig(),
        ewc=ewc or EwcConfig(),
        fisher_in=str(fisher_in) if fisher_in else None,
    )
    check(job.train, job.replay, job.ewc)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _write_rows(workdir / job.train_file, (_row(r, experience) for r in train_rows))
    _write_rows(workdir / job.replay_file, (_row(r, 0) for r in replay_rows))
    _write_rows(workdir / job.rehearsal_file, (_row(r, 0) for r in rehearsal_rows))
    doc = {
        "base_model": job.base_model,
        "experience": job.experience,
        "fisher_in": job.fisher_in,
        "train_file": job.train_file,
        "replay_file": job.replay_file,
        "rehearsal_file": job.rehearsal_file,
        "train": to_dict(job.train),
        "replay": to_dict(job.replay),
        "ewc": to_dict(job.ewc),
    }
    atomic_write_text(workdir / JOB_FILE, json.dumps(doc, indent=2))
    return workdir


def read_job(workdir: str | Path) -> Job:
    path = Path(workdir) / JOB_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: write the job with selftune.learners.jobs.write_job first")
    doc = json.loads(path.read_text(encoding="utf-8"))
    job = Job(
        base_model=doc["base_model"],
        experience=int(doc.get("experience", 0)),
        train=from_dict(TrainConfig, doc.get("train", {})),
        replay=from_dict(ReplayConfig, doc.get("replay", {})),
        ewc=from_dict(EwcConfig, doc.get("ewc", {})),
        fisher_in=doc.get("fisher_in"),
        train_file=doc.get("train_file", TRAIN_FILE),
        replay_file=doc.get("replay_file", REPLAY_FILE),
        rehearsal_file=doc.get("rehearsal_file", REHEARSAL_FILE),
    )
    check(job.train, job.replay, job.ewc)
    return job


def read_progress(workdir: str | Path) -> list[dict[str, Any]]:
    """The progress lines written so far (a line being written is skipped)."""
    path = Path(workdir) / PROGRESS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def read_result(workdir: str | Path) -> dict[str, Any] | None:
    path = Path(workdir) / RESULT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def read_failure(workdir: str | Path) -> dict[str, Any] | None:
    path = Path(workdir) / FAILED_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


class TrainingRun:
    """A training worker in a child process: watch it (``progress``), stop it (``stop``), get its result."""

    def __init__(self, workdir: Path, process: subprocess.Popen) -> None:
        self.workdir = workdir
        self.process = process

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def progress(self) -> list[dict[str, Any]]:
        return read_progress(self.workdir)

    def last_progress(self) -> dict[str, Any] | None:
        lines = self.progress()
        return lines[-1] if lines else None

    def result(self) -> dict[str, Any] | None:
        return read_result(self.workdir)

    def failure(self) -> dict[str, Any] | None:
        return read_failure(self.workdir)

    def stop(self, timeout: float) -> int:
        """SIGTERM: the worker checkpoints after its current step (a Fisher estimate ends at its next batch)
        and exits with ``EXIT_STOPPED``.

        If it has not exited after ``timeout`` seconds it is killed, and a warning says so (the last periodic
        checkpoint remains).
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("the worker of %s (pid %s) did not stop within %.3g s of SIGTERM: killed", self.workdir,
                            self.pid, timeout)
                self.process.kill()
        return self.process.wait()


def start_training(workdir: str | Path, *, python: str | None = None, env: dict[str, str] | None = None) -> TrainingRun:
    """Start ``python -m selftune.learners.train WORKDIR`` in its own session; output goes to train.log.

    Starting it again on the same directory after a crash, a kill or a stop resumes from the checkpoint.
    """
    workdir = Path(workdir).resolve()
    read_job(workdir)  # fail here, in the caller, on a missing or invalid job
    log = open(workdir / LOG_FILE, "ab")
    try:
        process = subprocess.Popen(
            [python or sys.executable, "-m", "selftune.learners.train", str(workdir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(workdir),
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    finally:
        log.close()
    return TrainingRun(workdir, process)


def worker_main(
    argv: list[str] | None,
    module: str,
    run: Callable[[Path, Callable[[], bool]], dict[str, Any]],
    *,
    stopped: Callable[[], type[BaseException]],
    summary: Sequence[str],
    failure: Callable[[BaseException], dict[str, Any]] = lambda error: {},
) -> int:
    """The command line of a worker, ``python -m MODULE WORKDIR``: ``run(workdir, stop_requested)``, where
    SIGTERM sets ``stop_requested``; ``run`` then checkpoints and raises the exception class ``stopped()``
    returns (called once the handler is in place, so it may import slow modules): exit ``EXIT_STOPPED``. Any
    other error goes to ``failed.json`` (plus ``failure(error)``'s fields) and exits 1; success prints the
    ``summary`` keys of the result."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m {module} WORKDIR", file=sys.stderr)
        return 2
    workdir = Path(args[0])
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(requested=True))
    stop_error = stopped()
    try:
        result = run(workdir, lambda: stop["requested"])
    except stop_error as error:
        print(str(error), file=sys.stderr)
        return EXIT_STOPPED
    except BaseException as error:  # recorded for the daemon, then a failing exit
        doc = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(), **failure(error)}
        atomic_write_json(workdir / FAILED_FILE, doc)
        traceback.print_exc()
        return 1
    print(json.dumps({k: result[k] for k in summary}))
    return 0


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (``ru_maxrss`` counts KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def exit_now(status: int) -> NoReturn:
    """End a worker process (``python -m``'s last line): logs and output flushed, then ``os._exit``. Its files
    are fsynced as they are written, and the interpreter's teardown of torch, transformers and Avalanche takes
    seconds (5-7 s on a busy 2-core box) that a stop within ``server.stop_timeout_seconds`` cannot spare."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _row(row: dict[str, Any] | Interaction, experience: int) -> dict[str, Any]:
    if isinstance(row, Interaction):
        return interaction_row(row, experience)
    out = dict(row)
    out.setdefault("experience", experience)
    return out


def _write_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, doc: Any) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2))
