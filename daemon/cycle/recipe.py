"""One generation, top to bottom: select, replay, train, merge, prune, heal, evaluate, gate, package, promote.

Runs in the cycle's worker process. Each step reads what earlier steps wrote into the cycle's
directory and writes its own result there atomically, so after a crash the worker re-runs the
step it was in and goes on; the cycle's row says which step that is. Only ``package`` makes a
generation visible (a directory renamed into place with its manifest) and only ``promote``
records it in the database, so no half-made generation is ever seen.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

# torch, transformers and peft load at import: only the worker process imports this module, and it evaluates.
from selftune.learners import heal as distill
from selftune.learners import jobs
from selftune.learners.lm import set_threads
from selftune.learners.merge import NonFiniteWeightsError, merge_adapter
from selftune.learners.prune import prune_directory
from selftune.learners.vocab import KEPT_IDS_FILE, load_kept_ids, trim_within_budget
from selftune.policies.gates import GateResult, evaluate_gates, promotion_decision
from selftune.policies.records import CHALLENGER, Cycle
from selftune.policies.selection import golden_prompts, select_training_data
from selftune.policies.training import cycle_threads

from selftune.daemon.context import Context
from selftune.daemon.cycle.control import FIRST_STEP, close_running_steps, service_running
from selftune.daemon.cycle.manifest import RESOURCES_RESULT, carries_fisher, generation_manifest
from selftune.daemon.cycle.probes import foundation_probe, foundation_rehearsal
from selftune.daemon.cycle.routing import build_routing, copy_route_index, near_duplicate_drops
from selftune.daemon.cycle.rows import (
    conversations, count_by_domain, interaction_row, messages, prompt_and_answer, row,
)
from selftune.daemon.cycle.suites import (
    decode_speeds, experience_rows, finite_weights_gate, foundation_suite, measure, suite_metrics,
)
from selftune.daemon.cycle.trainer import Cancelled, Rejected, run_job, stop_orphan_trainer
from selftune.daemon.cycle.workdir import (
    EVALUATE_RESULT, GATE_RESULT, GENERATION_ID_FILE, HEAL_DIR, HEAL_RESULT, HEALED_DIR, INTERMEDIATES,
    MERGE_RESULT, MERGED_DIR, PRUNE_RESULT, PRUNED_DIR, REHEARSAL_RESULT, REPLAY_RESULT,
    SELECT_RESULT, TRAIN_DIR, TRAIN_RESULT, TRIMMED_DIR, Work, cycle_dir,
)
from selftune.daemon.lineage import make_champion
from selftune.daemon.reports.render import write_reports
from selftune.daemon.views import generations_view

log = logging.getLogger(__name__)
CRASH_AT = "SELFTUNE_CRASH_AT"
"""Failpoint: a worker whose environment names a step here kills itself (SIGKILL) as that step begins."""
STEPS = (FIRST_STEP, "replay", "train", "merge", "prune", "heal", "evaluate", "gate", "package", "promote")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", KEPT_IDS_FILE)
"""The candidate's transformers files a generation holds (with the trainer's adapter and Fisher, same names);
a trimmed vocabulary's record of the parent ids it kept too."""


# -- the steps ------------------------------------------------------------------------------------------


def select(work: Work) -> dict[str, Any]:
    """New interactions of the branch since the parent's cutoff, filtered and split; plus golden prompts."""
    config = work.config
    cutoff = work.parent.metrics.get("cutoff", {}).get(work.cycle.branch, 0)
    with work.context.store.transaction() as tx:
        interactions = list(tx.interactions.since(work.cycle.branch, cutoff))
        feedback = [f for fs in tx.feedback.for_interactions([i.id for i in interactions]).values() for f in fs]
    near_duplicates = near_duplicate_drops(work, interactions)
    selection = select_training_data(interactions, feedback, config.selection, drop_ids=near_duplicates)
    golden = golden_prompts(interactions, feedback)
    newest = max((i.id for i in interactions), default=cutoff)
    train = [row(r.interaction_id, r.messages, r.domain) for r in selection.train]
    result = {
        "proceed": selection.decision.proceed,
        "reason": selection.decision.reason,
        "cutoff": {**work.parent.metrics.get("cutoff", {}), work.cycle.branch: newest},
        "counts": {**selection.counts(), "interactions": len(interactions)},
        "near_duplicates": {str(dropped): kept for dropped, kept in near_duplicates.items()},
        "domains": count_by_domain(train),
        "train": train,
        "held_out": [row(r.interaction_id, r.messages, r.domain) for r in selection.held_out],
        "golden": [{"id": g.interaction_id, "messages": messages(g.context), "expected": g.expected,
                    "rejected": list(g.rejected)} for g in golden],
    }
    work.write(SELECT_RESULT, result)
    return {k: result[k] for k in ("proceed", "reason", "counts")}


def replay(work: Work) -> dict[str, Any]:
    """The replay pool: the branch's buffer of earlier training rows, and the foundation's rehearsal rows."""
    with work.context.store.transaction() as tx:
        members = tx.replay.members(work.cycle.branch)
        rows = [{**interaction_row(tx.interactions.get(m.interaction_id)), "experience": m.experience,
                 "priority": m.priority} for m in members]
    rehearsal = foundation_rehearsal(work.context, work.config.replay.rehearsal)
    work.write(REPLAY_RESULT, rows)
    work.write(REHEARSAL_RESULT, rehearsal)
    return {"rows": len(rows), "experiences": len({r["experience"] for r in rows}), "rehearsal": len(rehearsal)}


def train(work: Work) -> dict[str, Any]:
    """LoRA on the parent with replay and EWC, in a child process that checkpoints and can resume."""
    config = work.config
    workdir = work.path(TRAIN_DIR)
    stop_orphan_trainer(work)
    if not (workdir / jobs.JOB_FILE).exists():
        parent_fisher = work.parent_dir / jobs.FISHER_FILE
        jobs.write_job(workdir, base_model=work.parent_dir, train_rows=work.read(SELECT_RESULT)["train"],
                       replay_rows=work.read(REPLAY_RESULT), rehearsal_rows=work.read(REHEARSAL_RESULT),
                       experience=work.cycle.id, train=work.train_config,
                       replay=config.replay, ewc=config.ewc, fisher_in=parent_fisher if parent_fisher.exists() else None)
    result, curves = run_job(work, workdir, config.train.steps)
    work.write(TRAIN_RESULT, {**result, "curves": curves})
    return {k: result.get(k) for k in ("steps", "tokens", "loss_first", "loss_last", "tokens_per_s", "ewc_applied")}


def merge(work: Work) -> dict[str, Any]:
    """The trained adapter folded into the parent's weights (trimmed to the energy it keeps, if set)."""
    shutil.rmtree(work.path(MERGED_DIR), ignore_errors=True)
    try:
        facts = merge_adapter(work.parent_dir, work.path(TRAIN_DIR) / jobs.ADAPTER_DIR, work.path(MERGED_DIR),
                              trim=work.config.trim)
    except NonFiniteWeightsError as exc:
        raise Rejected(GateResult("finite_weights", False, None, None, None, str(exc))) from exc
    work.write(MERGE_RESULT, facts)
    return facts


def prune(work: Work) -> dict[str, Any]:
    """Make the merged model smaller (if enabled): the vocabulary its traffic does not use, then the layers that
    matter least to it, stepwise within the branch's loss budget on its held-out rows, or a fixed fraction."""
    config = work.config
    if not config.pruning.enabled:
        return {"enabled": False}
    data = work.read(SELECT_RESULT)
    source, vocab, reference_loss = work.path(MERGED_DIR), {"enabled": False}, None
    unpruned_params = work.read(MERGE_RESULT)["params"]
    # The specialty's held-out loss, cut as evaluation cuts it, is checked after the trim and between removals;
    # the trim and the layer cuts share one budget (max_drop_cost) counted from the merged model.
    held_out = {"held_out": conversations(data["held_out"][:config.cycle.max_eval_rows]),
                "max_length": config.train.max_length}
    if config.trim_vocab.enabled:
        # What the specialty reads and writes (new rows, replay, rehearsal: never the held-out rows, which
        # test it), and general prose, whose most frequent tokens stay so that ordinary text reads in words.
        traffic = [*data["train"], *work.read(REPLAY_RESULT), *work.read(REHEARSAL_RESULT)]
        vocab, reference_loss = trim_within_budget(source, work.path(TRIMMED_DIR), traffic, foundation_probe(work.context),
                                                   config.trim_vocab, max_cost=config.pruning.max_drop_cost, **held_out)
        source = work.path(TRIMMED_DIR) if vocab.get("enabled", True) else source
    shutil.rmtree(work.path(PRUNED_DIR), ignore_errors=True)
    report = prune_directory(source, work.path(PRUNED_DIR), prompt_and_answer(data["train"]), config.pruning,
                             held_out=held_out["held_out"], held_out_max_length=held_out["max_length"],
                             params_reference=unpruned_params, reference_loss=reference_loss)
    if (source / KEPT_IDS_FILE).exists():
        shutil.copy2(source / KEPT_IDS_FILE, work.path(PRUNED_DIR) / KEPT_IDS_FILE)
    # the step's before and after are the unpruned candidate's and the final ones, vocabulary included
    report.update(params_before=unpruned_params, params_ratio=report["params_after"] / unpruned_params, vocab=vocab)
    work.write(PRUNE_RESULT, report)
    return {"params_before": unpruned_params, "params_after": report["params_after"],
            "vocab_size_after": vocab.get("vocab_size_after"), "layers_removed": report["layers_removed"]}


def heal(work: Work) -> dict[str, Any]:
    """Train the pruned model back (``pruning.heal_kind``): a short LoRA pass on the new rows and the replay
    pool (no EWC), merged in; or a distillation towards the unpruned candidate, full weights next to the cuts."""
    config = work.config
    if not (config.pruning.enabled and config.pruning.heal_steps):
        return {"enabled": False}
    pruned = work.read(PRUNE_RESULT)
    skip = _why_no_heal(pruned, config.pruning.heal_kind)
    if skip:  # the pruned model is the candidate as it is
        facts = {"enabled": False, "kind": config.pruning.heal_kind, "reason": skip}
        work.write(HEAL_RESULT, facts)
        return facts
    workdir = work.path(HEAL_DIR)
    rows = {"train_rows": work.read(SELECT_RESULT)["train"], "replay_rows": work.read(REPLAY_RESULT),
            "rehearsal_rows": work.read(REHEARSAL_RESULT)}
    stop_orphan_trainer(work)
    shutil.rmtree(work.path(HEALED_DIR), ignore_errors=True)
    if config.pruning.heal_kind == "distill":
        if not (workdir / jobs.JOB_FILE).exists():
            distill.write_heal_job(workdir, student=work.path(PRUNED_DIR), teacher=work.path(MERGED_DIR),
                                   prune_report=pruned, pruning=config.pruning,
                                   train=work.train_config,
                                   kept_ids=load_kept_ids(work.path(PRUNED_DIR)), out_dir=work.path(HEALED_DIR), **rows)
        result, curves = run_job(work, workdir, config.pruning.heal_steps, start=distill.start_heal)
        if (work.path(PRUNED_DIR) / KEPT_IDS_FILE).exists():
            shutil.copy2(work.path(PRUNED_DIR) / KEPT_IDS_FILE, work.path(HEALED_DIR) / KEPT_IDS_FILE)
    else:
        if not (workdir / jobs.JOB_FILE).exists():
            jobs.write_job(workdir, base_model=work.path(PRUNED_DIR), experience=work.cycle.id,
                           train=replace(work.train_config, steps=config.pruning.heal_steps),
                           replay=config.replay,
                           ewc=replace(config.ewc, strength=0.0, fisher_examples=0), **rows)
        result, curves = run_job(work, workdir, config.pruning.heal_steps)
        try:
            merge_adapter(work.path(PRUNED_DIR), workdir / jobs.ADAPTER_DIR, work.path(HEALED_DIR))
        except NonFiniteWeightsError as exc:
            raise Rejected(GateResult("finite_weights", False, None, None, None, f"heal: {exc}")) from exc
    facts = {"enabled": True, "kind": config.pruning.heal_kind,
             **{k: result.get(k) for k in ("steps", "tokens", "loss_first", "loss_last", "tokens_per_s")},
             "curves": curves}
    work.write(HEAL_RESULT, facts)
    return {k: v for k, v in facts.items() if k != "curves"}


def _why_no_heal(pruned: dict[str, Any], kind: str) -> str:
    """Why the pruned model needs no heal ('' if it does)."""
    if pruned["params_after"] == pruned["params_before"]:
        return "pruning removed nothing"
    if kind == "distill" and not pruned["layers_removed"] and pruned["intermediate_size_after"] == pruned["intermediate_size_before"]:
        return "the distillation heal trains the layers next to a cut, and no layer was cut (only the vocabulary)"
    return ""


def evaluate(work: Work) -> dict[str, Any]:
    """The same suites on the candidate and its parent (``suites.measure``): new data, earlier experiences,
    foundation, golden, size, speed; and, when it was pruned, the new data, size and speed of the unpruned
    candidate it was cut from, which the prune-cost gate compares it with."""
    data = work.read(SELECT_RESULT)
    config = work.config
    limit = config.cycle.max_eval_rows
    common = {"held_out": data["held_out"][:limit], "max_length": config.train.max_length}
    full = {"earlier": experience_rows(work, limit), "probe": foundation_probe(work.context),
            "golden": data["golden"], "samples": config.cycle.sample_answers}
    candidate = measure(work.candidate_dir, **common, **full)
    broken = finite_weights_gate(candidate)  # e.g. a heal that diverged: no generation is made of it
    if broken:
        raise Rejected(broken)
    suites = {"parent": measure(work.parent_dir, **common, **full), "candidate": candidate}
    if config.pruning.enabled and work.candidate_dir != work.path(MERGED_DIR):
        suites["unpruned"] = measure(work.path(MERGED_DIR), **common)
    timed = {"candidate": work.candidate_dir, "unpruned": work.path(MERGED_DIR) if "unpruned" in suites else None}
    for name, fields in decode_speeds(work.parent_dir, timed).items():  # timed together: see suites.decode_speeds
        suites[name].update(fields)
    work.write(EVALUATE_RESULT, suites)
    work.write(RESOURCES_RESULT, {"evaluate_peak_rss_mb": jobs.peak_rss_mb()})  # the worker's: evaluation is its peak
    return {name: {k: v for k, v in suite.items() if k != "samples"} for name, suite in suites.items()}


def gate(work: Work) -> dict[str, Any]:
    """The gates on the suites (and the foundation's, for drift), and what to do with the candidate.

    A specialist's earlier experiences outside its scope are measured, not gated; a pruned candidate also
    faces the prune-cost gate against its unpruned self."""
    suites = work.read(EVALUATE_RESULT)
    config = work.config
    unpruned = suites.get("unpruned")
    results = evaluate_gates(suite_metrics(suites["candidate"]), suite_metrics(suites["parent"]), config.gates,
                             foundation=foundation_suite(work), unpruned=suite_metrics(unpruned) if unpruned else None,
                             scope=work.branch["domains"] if work.branch["specialist"] else None)
    decision = promotion_decision(results, config.cycle.auto_promote)
    verdict = {"action": decision.action, "status": decision.status, "reason": decision.reason,
               "gates": [r.to_dict() for r in results]}
    work.write(GATE_RESULT, verdict)
    return {"action": decision.action, "reason": decision.reason}


def package(work: Work) -> dict[str, Any]:
    """Write the generation directory (model, adapter, Fisher, reports, manifest), renamed into place."""
    generation_id = _reserved_generation_id(work)
    artifacts = work.context.artifacts
    if generation_id not in artifacts.ids():
        build_routing(work)  # a specialist's route index and thresholds: in the directory and its manifest
        manifest = generation_manifest(work, generation_id)

        def fill(directory: Path) -> dict[str, Any]:
            for name in MODEL_FILES:
                if (work.candidate_dir / name).exists():
                    shutil.copy2(work.candidate_dir / name, directory / name)
            shutil.copytree(work.path(TRAIN_DIR) / jobs.ADAPTER_DIR, directory / jobs.ADAPTER_DIR)
            if carries_fisher(work):
                shutil.copy2(work.path(TRAIN_DIR) / jobs.FISHER_FILE, directory / jobs.FISHER_FILE)
            copy_route_index(work, directory)
            write_reports(directory, generation_id, manifest, work.read(EVALUATE_RESULT), lineage=generations_view(work.context))
            return {}

        artifacts.write(generation_id, fill, manifest)
    artifacts.verify(generation_id)
    return {"generation": generation_id}


def promote(work: Work) -> dict[str, Any]:
    """Record the generation; move the alias (champion, or challenger awaiting approval); update replay."""
    generation_id = _reserved_generation_id(work)
    artifacts = work.context.artifacts
    manifest = artifacts.verify(generation_id, deep=False)
    verdict = work.read(GATE_RESULT)
    branch = work.cycle.branch
    with work.context.store.transaction(write=True) as tx:
        if tx.generations.find(generation_id) is None:
            tx.generations.add(branch, str(artifacts.path(generation_id)), manifest["checksum"],
                               manifest["params"], parent_id=work.parent.id, status=verdict["status"],
                               metrics=manifest["metrics"], cycle_id=work.cycle.id, id=generation_id)
        if verdict["action"] == "promote":
            make_champion(tx, branch, generation_id, manifest["data"]["replay_buffer"])
        elif verdict["action"] == "await_approval":
            tx.aliases.set(branch, CHALLENGER, generation_id)
        tx.cycles.set_generation(work.cycle.id, generation_id)
    return {"generation": generation_id, "status": verdict["status"]}


STEP_FUNCTIONS: dict[str, Callable[[Work], dict[str, Any]]] = {
    step.__name__: step for step in (select, replay, train, merge, prune, heal, evaluate, gate, package, promote)}
assert tuple(STEP_FUNCTIONS) == STEPS


# -- running them ---------------------------------------------------------------------------------------


def run_cycle(context: Context, cycle_id: int) -> Cycle:
    """Run (or resume) the cycle from the step its row names, recording each step's outcome and timing."""
    with context.store.transaction() as tx:
        cycle = tx.cycles.get(cycle_id)
        parent = tx.generations.get(cycle.parent_generation_id)
    work = Work(context, cycle, parent)
    work.dir.mkdir(parents=True, exist_ok=True)
    # Decided once, here, as the worker starts (or resumes): its evaluation and its trainers use these.
    serving, cores = service_running(context), os.cpu_count() or 1
    work = replace(work, threads=cycle_threads(work.config.train.threads, cores, serving))
    set_threads(work.threads)
    log.info("cycle %s: %s torch thread(s) (train.threads = %s, %s cores, %s)", cycle_id, work.threads,
             work.config.train.threads, cores, "serving: one core left for it" if serving else "no service")
    with context.store.transaction(write=True) as tx:  # steps a crash cut short are re-run below; close their records
        close_running_steps(tx, cycle_id, "interrupted")
    for step in STEPS[STEPS.index(cycle.state):]:
        try:
            detail = _recorded(work, step)
        except Rejected as exc:
            return _finish(context, cycle_id, "rejected", None, gate=exc.gate)
        if step == "select" and not detail["proceed"]:
            return _finish(context, cycle_id, "skipped", detail["reason"])
        next_step = STEPS[STEPS.index(step) + 1] if step != STEPS[-1] else "done"
        with context.store.transaction(write=True) as tx:
            tx.cycles.set_state(cycle_id, next_step)
    return _finish(context, cycle_id, work.read(GATE_RESULT)["status"], None)


def _recorded(work: Work, step: str) -> dict[str, Any]:
    started = time.time()
    with work.context.store.transaction(write=True) as tx:
        event = tx.cycles.add_event(work.cycle.id, step, "running")
    if os.environ.get(CRASH_AT) == step:  # failpoint for the crash tests: a real kill -9, here
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        detail = STEP_FUNCTIONS[step](work)
    except Rejected as exc:
        _close_event(work, event.id, "rejected", {"reason": str(exc), "seconds": time.time() - started})
        raise
    except Cancelled:
        _close_event(work, event.id, "cancelled", {"seconds": time.time() - started})
        raise
    except BaseException as exc:
        _close_event(work, event.id, "failed", {"error": f"{type(exc).__name__}: {exc}", "seconds": time.time() - started})
        raise
    _close_event(work, event.id, "ok", {**detail, "seconds": round(time.time() - started, 3)})
    return detail


def _close_event(work: Work, event_id: int, outcome: str, detail: dict[str, Any]) -> None:
    with work.context.store.transaction(write=True) as tx:
        tx.cycles.finish_event(event_id, outcome, json.loads(json.dumps(detail, default=str)))


def _finish(context: Context, cycle_id: int, outcome: str, error: str | None, gate: GateResult | None = None) -> Cycle:
    with context.store.transaction(write=True) as tx:
        if gate is not None:
            tx.cycles.add_event(cycle_id, "gate", "rejected", detail={"gates": [gate.to_dict()]})
        cycle = tx.cycles.finish(cycle_id, outcome, error, state="done")
    # The models in between are copies of what the generation holds (or of nothing kept): drop them.
    # Step results, logs and the adapter stay for inspection.
    for name in INTERMEDIATES:
        shutil.rmtree(cycle_dir(context, cycle_id) / name, ignore_errors=True)
    return cycle


# -- helpers --------------------------------------------------------------------------------------------


def _reserved_generation_id(work: Work) -> int:
    """The id this cycle's generation gets, chosen once and remembered across restarts."""
    if work.path(GENERATION_ID_FILE).exists():
        return int(work.read(GENERATION_ID_FILE))
    with work.context.store.transaction() as tx:
        used = [g.id for g in tx.generations.list()]
    generation_id = max([*used, *work.context.artifacts.ids()]) + 1
    work.write(GENERATION_ID_FILE, generation_id)
    return generation_id
