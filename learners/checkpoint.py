"""The resumable state of a worker (``learners.train``, ``learners.heal``), in its job's working directory.

``checkpoint/state.pt`` holds the trained tensors (``"trained"``: name -> tensor), the optimizer, the RNG
(CPU, and CUDA where present), the progress history and the step, with the fingerprint of the job it was
written for; ``checkpoint/state.json`` (``{"step", "steps"}``) lets a watcher read the step without torch.
Both are written atomically (a fsynced temporary file renamed into place). A rerun resumes only the job the
checkpoint was written for: ``fingerprint`` hashes the job's files, and ``resume`` refuses any other.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import jobs

STATE_FILE = "state.pt"
SUMMARY_FILE = "state.json"

Params = Sequence[tuple[str, torch.Tensor]]
"""The trained parameters as ``(name, parameter)`` pairs, in a fixed order."""


def fingerprint(workdir: Path, names: Iterable[str], stamped: Iterable[str | Path] = ()) -> str:
    """What a checkpoint must match to be resumed: the files ``names`` of ``workdir`` byte for byte (a missing
    one as empty), and the files ``stamped`` (too large to read, e.g. a running Fisher) by path, size and mtime
    (a missing one is left out)."""
    digest = hashlib.sha256()
    for name in names:
        path = workdir / name
        digest.update(name.encode() + b"\0")
        digest.update(path.read_bytes() if path.exists() else b"")
    for other in stamped:
        if Path(other).exists():
            stat = Path(other).stat()
            digest.update(f"{other}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def resume(workdir: Path, fingerprint: str, params: Params, optimizer: torch.optim.Optimizer,
           history: list[dict[str, Any]], *, kind: str = "job") -> int:
    """Load the checkpoint if there is one for this very job (``kind`` names it in the error): the trained
    tensors into ``params``, the optimizer, the RNG, ``history``; ``progress.jsonl`` is cut back to the
    checkpoint's step (or removed when there is no checkpoint). Returns the step to continue from."""
    path = workdir / jobs.CHECKPOINT_DIR / STATE_FILE
    progress = workdir / jobs.PROGRESS_FILE
    if not path.exists():
        progress.unlink(missing_ok=True)
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} belongs to another {kind} (job.json or its data changed since it was written); "
            f"delete {path.parent} to start this {kind} from scratch"
        )
    with torch.no_grad():
        for name, p in params:
            p.copy_(state["trained"][name])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if torch.cuda.is_available() and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    history.extend(json.loads(state["history"]))
    step = int(state["step"])
    # progress lines written after the checkpoint by the interrupted run will be written again
    kept = [json.dumps(line) for line in jobs.read_progress(workdir) if line["step"] <= step]
    jobs.atomic_write_text(progress, "".join(k + "\n" for k in kept))
    return step


def save(workdir: Path, step: int, steps: int, params: Params, optimizer: torch.optim.Optimizer,
         history: list[dict[str, Any]], fingerprint: str) -> None:
    """Write the checkpoint after ``step`` of ``steps`` (what ``resume`` reads back)."""
    directory = workdir / jobs.CHECKPOINT_DIR
    directory.mkdir(exist_ok=True)
    state = {
        "step": step,
        "trained": {name: p.detach().cpu().clone() for name, p in params},
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": json.dumps(history),
        "fingerprint": fingerprint,
    }
    tmp = directory / (STATE_FILE + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / STATE_FILE)
    jobs.atomic_write_json(directory / SUMMARY_FILE, {"step": step, "steps": steps})


def append_progress(workdir: Path, record: dict[str, Any]) -> None:
    """Append one line to ``progress.jsonl`` (flushed to disk: a watcher may read it at once)."""
    with open(workdir / jobs.PROGRESS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
