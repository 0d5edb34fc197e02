"""A generation's ``generation.json``, as a cycle writes it: where it came from, what it learnt on, how it scored.

Built by ``package`` from the results the earlier steps left in the cycle's work directory.
"""

from __future__ import annotations

from typing import Any

from selftune.learners import jobs  # light on purpose (no torch): the names inside a training job's folder

from selftune.daemon.cycle.routing import routing_record
from selftune.daemon.lineage import lineage_card
from selftune.daemon.cycle.workdir import (
    EVALUATE_RESULT, GATE_RESULT, HEAL_RESULT, MERGE_RESULT, PRUNE_RESULT, REHEARSAL_RESULT, REPLAY_RESULT,
    SELECT_RESULT, TRAIN_DIR, TRAIN_RESULT, Work,
)

RESOURCES_RESULT = "resources.json"
"""In the cycle's directory: the worker's peak resident memory, written as evaluation ends (its peak)."""


def generation_manifest(work: Work, generation_id: int) -> dict[str, Any]:
    """generation.json: parent, branch (its scope and settings), cycle, data snapshot, training settings,
    pruning, metrics, gates."""
    config = work.config
    data = work.read(SELECT_RESULT)
    trained = work.read(TRAIN_RESULT)
    verdict = work.read(GATE_RESULT)
    suites = work.read(EVALUATE_RESULT)
    candidate = {k: v for k, v in suites["candidate"].items() if k != "samples"}
    experiences = dict(work.parent.metrics.get("experiences", {}))
    for domain, ids in _held_out_ids_by_domain(data["held_out"], config.cycle.max_eval_rows).items():
        experiences[domain] = sorted(set(experiences.get(domain, [])) | set(ids))[: config.cycle.max_eval_rows]
    return {
        "parent": work.parent.id,
        "branch": work.cycle.branch,
        "cycle": work.cycle.id,
        "kind": "generation",
        # The branch's scope and the settings this cycle ran with that differ from the defaults (global
        # ones included): what the reports show as the branch's configuration.
        "branch_config": {"domains": work.branch["domains"], "specialist": work.branch["specialist"],
                          "settings": work.branch["settings"]},
        "params": candidate["params"],
        "status": verdict["status"],
        "data": {"counts": data["counts"], "domains": data["domains"],
                 "train_ids": [r["id"] for r in data["train"]], "held_out_ids": [r["id"] for r in data["held_out"]],
                 "replay_ids": [r["id"] for r in work.read(REPLAY_RESULT)],
                 "rehearsal_rows": len(work.read_optional(REHEARSAL_RESULT) or []), "cutoff": data["cutoff"],
                 "replay_buffer": [int(m["id"]) for m in trained.get("replay_buffer", [])]},
        "training": {"steps": trained.get("steps"), "learning_rate": config.train.learning_rate,
                     "lora_rank": config.train.lora_rank, "batch_size": config.train.batch_size,
                     "tokens": trained.get("tokens"), "replay_ratio": config.replay.ratio,
                     "rehearsal_ratio": config.replay.rehearsal_ratio,
                     "ewc_lambda": config.ewc.strength, "threads": trained.get("threads"),
                     "curves": trained.get("curves", {})},
        # peak resident memory (MiB) of the trainer and of the worker, which evaluates
        "resources": {"train_peak_rss_mb": trained.get("peak_rss_mb"),
                      **(work.read_optional(RESOURCES_RESULT) or {"evaluate_peak_rss_mb": None})},
        "merge": work.read_optional(MERGE_RESULT),
        "pruning": {**(work.read_optional(PRUNE_RESULT) or {"enabled": False}),
                    "heal": work.read_optional(HEAL_RESULT) or {"enabled": False}},
        "fisher": {"carried": carries_fisher(work), "representation": trained.get("fisher_representation"),
                   "seconds": trained.get("fisher_seconds")},
        "metrics": {"candidate": candidate, "parent": {k: v for k, v in suites["parent"].items() if k != "samples"},
                    # the candidate before pruning (new data, size, speed), when it was pruned
                    **({"unpruned": suites["unpruned"]} if "unpruned" in suites else {}),
                    "cutoff": data["cutoff"], "experiences": experiences},
        # a specialist's route index (router.faiss/router.json) and its route and deferral thresholds
        "routing": routing_record(work),
        "gates": verdict["gates"],
        "decision": {"action": verdict["action"], "reason": verdict["reason"]},
        "card": lineage_card(work.context),  # the foundation's base_model, license, language: for the model card
    }


def carries_fisher(work: Work) -> bool:
    """The trainer's (folded) Fisher anchors the next cycle; not across pruning, which changed the shapes."""
    return (work.path(TRAIN_DIR) / jobs.FISHER_FILE).exists() and not work.config.pruning.enabled


def _held_out_ids_by_domain(rows: list[dict[str, Any]], limit: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for row in rows:
        out.setdefault(row["domain"], []).append(row["id"])
    return {domain: ids[:limit] for domain, ids in out.items()}
