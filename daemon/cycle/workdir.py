"""A cycle's work directory, ``<state>/cycles/<id>/``: every name in it, and how steps write and read there.

Each step writes its result as one JSON file, atomically, and later steps read it back: after a crash
the worker re-runs the step it was in and finds the earlier results where they were. The training
jobs and the models between steps are folders; ``INTERMEDIATES`` are dropped when the cycle ends.
``views.cycle_view`` reads the gate verdict and the training progress from here too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from selftune.learners import jobs  # light on purpose (no torch): the names inside a training job's folder
from selftune.policies.branches import changed_settings, restore
from selftune.policies.config import Config
from selftune.policies.records import Cycle, Generation
from selftune.policies.training import TrainConfig

from selftune.daemon.context import Context
from selftune.daemon.lineage import branch_config

CYCLES_DIR = "cycles"
"""Under the state directory: one work directory per cycle, named by the cycle's id."""

# Step results, one JSON file per step.
SELECT_RESULT = "select.json"
"""New rows split into train, held out and golden; counts, domains, the cutoff the generation records."""
REPLAY_RESULT = "replay.json"
"""The branch's replay buffer rows."""
REHEARSAL_RESULT = "rehearsal.json"
"""The foundation's rehearsal rows."""
TRAIN_RESULT = "train.json"
"""The trainer's result and curves."""
MERGE_RESULT = "merge.json"
PRUNE_RESULT = "prune.json"
HEAL_RESULT = "heal.json"
EVALUATE_RESULT = "evaluate.json"
"""The suites of the parent and the candidate."""
GATE_RESULT = "gate.json"
"""The verdict: action, status, reason and every gate."""
BRANCH_RESULT = "branch.json"
"""The branch's scope and the settings the cycle runs with (those differing from the defaults), fixed when
the cycle first reads them: a resumed cycle keeps them, and the generation's manifest records them."""
GENERATION_ID_FILE = "generation_id.json"
"""The generation id reserved by ``package``, kept across restarts."""
PROGRESS_FILE = "progress.json"
"""The running training job's last step, for the cycle's view."""

# Training jobs: learners.jobs working directories (job, data, checkpoint, adapter, Fisher).
TRAIN_DIR = "train"
HEAL_DIR = "heal"

# Models between steps.
MERGED_DIR = "merged"
TRIMMED_DIR = "trimmed"
"""The merged model with its vocabulary trimmed, before layers are dropped."""
PRUNED_DIR = "pruned"
HEALED_DIR = "healed"

# The processes.
WORKER_PID_FILE = "worker.pid"
WORKER_LOG_FILE = "worker.log"
TRAINER_PID_FILE = "training.pid"
"""The trainer the worker started, so a restarted worker can stop one left running."""

INTERMEDIATES = (MERGED_DIR, TRIMMED_DIR, PRUNED_DIR, HEALED_DIR,
                 f"{TRAIN_DIR}/{jobs.CHECKPOINT_DIR}", f"{HEAL_DIR}/{jobs.CHECKPOINT_DIR}")
"""What a finished cycle's directory no longer needs (hundreds of MB each with the real model)."""


def cycle_dir(context: Context, cycle_id: int) -> Path:
    return context.state / CYCLES_DIR / str(cycle_id)


def read_result(directory: Path, name: str) -> Any:
    """The JSON file ``name`` in a cycle's ``directory``, or None if no step has written it (yet)."""
    path = directory / name
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class Work:
    """Where one cycle's steps read and write, and the configuration they run with."""

    context: Context
    cycle: Cycle
    parent: Generation
    threads: int = 0
    """Torch threads of the cycle's training and evaluation, as ``recipe.run_cycle`` decided them (0: not yet)."""

    @cached_property
    def branch(self) -> dict[str, Any]:
        """``{"name", "domains", "specialist", "settings"}``: the branch's scope and its effective settings
        that differ from the defaults, as recorded in ``BRANCH_RESULT`` when the cycle first asked."""
        recorded = self.read_optional(BRANCH_RESULT)
        if recorded is None:
            with self.context.store.transaction() as tx:
                branch = tx.branches.get(self.cycle.branch)
            effective = branch_config(self.context.config, branch)
            recorded = {"name": branch.name, "domains": list(branch.domains), "specialist": branch.is_specialist,
                        "settings": changed_settings(effective)}
            self.dir.mkdir(parents=True, exist_ok=True)
            self.write(BRANCH_RESULT, recorded)
        return recorded

    @cached_property
    def config(self) -> Config:
        """The branch's effective configuration (``policies.branches``: global, specialist defaults, its
        [branches.NAME] table, its stored settings), the same for the whole cycle even across restarts:
        a `branch set` while it runs applies from the next cycle on. Steps read this, not ``context.config``."""
        return restore(self.context.config, self.branch["settings"])

    @property
    def train_config(self) -> TrainConfig:
        """``config.train`` with the threads this cycle runs with (what its trainers are given)."""
        return replace(self.config.train, threads=self.threads)

    @property
    def dir(self) -> Path:
        return cycle_dir(self.context, self.cycle.id)

    def path(self, name: str) -> Path:
        return self.dir / name

    def read(self, name: str) -> Any:
        """A result an earlier step wrote (a missing one is a bug in the step order: FileNotFoundError)."""
        return json.loads(self.path(name).read_text())

    def read_optional(self, name: str) -> Any:
        """A result of a step that may have nothing to write (prune, heal), or None."""
        return read_result(self.dir, name)

    def write(self, name: str, value: Any) -> None:
        """Atomically: a crash leaves the old file or the new one, never half of one."""
        tmp = self.path(name + ".tmp")
        tmp.write_text(json.dumps(value, indent=1, default=str))
        os.replace(tmp, self.path(name))

    @property
    def parent_dir(self) -> Path:
        return Path(self.parent.path)

    @property
    def candidate_dir(self) -> Path:
        """The model the cycle made: merged, then pruned and healed if the configuration says so."""
        pruning = self.config.pruning
        if not pruning.enabled:
            return self.path(MERGED_DIR)
        healed = self.read_optional(HEAL_RESULT)  # a heal that found nothing cut leaves the pruned model as it is
        healing = pruning.heal_steps and (healed is None or healed.get("enabled", True))
        return self.path(HEALED_DIR) if healing else self.path(PRUNED_DIR)
