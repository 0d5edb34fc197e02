"""The training worker: ``python -m selftune.learners.train WORKDIR`` (see ``jobs`` for the directory).

Reads like a recipe: setup (job, data, model, adapter, resume), train (one Avalanche experience with
replay and EWC), finish (replay buffer, Fisher, adapter, result). SIGTERM checkpoints after the current
step (a Fisher estimate ends at its next batch) and exits with ``EXIT_STOPPED``; a rerun resumes from the last
checkpoint, bit-for-bit on the same machine and thread count, because batches, learning rate and RNG are all
functions of the seed and step.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from selftune.policies.replay import fisher_sample
from selftune.policies.training import EwcConfig, TrainConfig

from . import checkpoint, jobs
from .data import encode_rows, read_rows
from .fisher import EwcPenalty, estimate_fisher, fold_fisher, load_fisher, save_fisher
from .lm import attach_lora, load_base, load_tokenizer, pick_device, set_threads, trainable_parameters


def run_job(workdir: str | Path, stop_requested: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Run (or resume, or just return the result of) the job in ``workdir``; returns ``result.json``."""
    # Avalanche (~7 s) is imported here, not with this module, so that `python -m` installs its SIGTERM
    # handler (main) before paying for it: a stop asked for meanwhile is seen, not fatal
    from .replay import ExperienceDiversityBuffer, KCenterSelection, buffer_members, reservoir_buffer
    from .strategy import (
        CausalLMStrategy,
        CheckpointPlugin,
        EwcLoraPlugin,
        PlannedReplayPlugin,
        ProgressPlugin,
        Stopped,
        make_dataset,
        make_experience,
    )

    def stop_if_requested() -> None:  # during setup nothing has changed since the last checkpoint: just go
        if stop_requested():
            raise Stopped("stopped before training began; rerun the job to resume")

    workdir = Path(workdir)
    done = jobs.read_result(workdir)
    if done is not None:
        return done
    job = jobs.read_job(workdir)
    (workdir / jobs.FAILED_FILE).unlink(missing_ok=True)
    cfg, replay_cfg, ewc_cfg = job.train, job.replay, job.ewc
    started = time.perf_counter()

    # ---- setup (a stop is looked at after its slow parts: the imports, the model load, the Fisher and resume)
    stop_if_requested()
    set_threads(cfg.threads)
    device = pick_device()
    tokenizer = load_tokenizer(job.base_model)
    pad_id = tokenizer.pad_token_id  # load_tokenizer sets one (chat.pad_id's rule)
    new_rows = [{**r, "experience": job.experience} for r in read_rows(workdir / job.train_file)]
    replay_path = workdir / job.replay_file
    replay_rows = read_rows(replay_path) if replay_path.exists() else []
    new_items, dropped = encode_rows(tokenizer, new_rows, cfg.max_length)
    replay_items, replay_dropped = encode_rows(tokenizer, replay_rows, cfg.max_length)
    rehearsal_path = workdir / job.rehearsal_file
    rehearsal_items, _ = encode_rows(tokenizer, read_rows(rehearsal_path) if rehearsal_path.exists() else [], cfg.max_length)
    if not new_items:
        raise ValueError(
            f"{workdir / job.train_file}: none of its {len(new_rows)} rows has an assistant turn within "
            f"max_length={cfg.max_length} tokens; add rows or raise train.max_length"
        )

    model = attach_lora(load_base(job.base_model, base_dtype=cfg.base_dtype, device=device), cfg)
    stop_if_requested()
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    fisher_in = load_fisher(Path(job.fisher_in)).to(ewc_cfg.representation) if job.fisher_in else None
    anchor = "parent" if fisher_in is not None else None
    if fisher_in is None and rehearsal_items and ewc_cfg.enabled and ewc_cfg.fisher_examples > 0:
        # No running Fisher yet (a foundation parent): anchor on the parent's own answers to general prompts,
        # estimated now, while the fresh adapter leaves the model equal to its base.
        fisher_in = _fisher(model, rehearsal_items, cfg, ewc_cfg, pad_id, before_batch=stop_if_requested)
        anchor = "rehearsal"
    penalty = EwcPenalty(model, fisher_in, ewc_cfg.strength) if fisher_in is not None and ewc_cfg.enabled else None

    fingerprint = checkpoint.fingerprint(workdir, (jobs.JOB_FILE, job.train_file, job.replay_file, job.rehearsal_file),
                                         stamped=[job.fisher_in] if job.fisher_in else [])
    history: list[dict[str, Any]] = []
    start_step = checkpoint.resume(workdir, fingerprint, params, optimizer, history)
    stop_if_requested()

    def save(strategy: CausalLMStrategy) -> None:
        checkpoint.save(workdir, strategy.step, cfg.steps, params, optimizer, history, fingerprint)

    plugins: list[Any] = [
        ProgressPlugin(workdir / jobs.PROGRESS_FILE, cfg.progress_every, history),
        CheckpointPlugin(save, cfg.checkpoint_every, stop_requested),
    ]
    if penalty is not None:
        plugins.append(EwcLoraPlugin(penalty))
    policy = None
    if replay_cfg.buffer_size > 0:
        if replay_cfg.selection == "reservoir":
            policy = reservoir_buffer(replay_cfg.buffer_size, replay_items, pad_id)
        else:
            policy = ExperienceDiversityBuffer(replay_cfg.buffer_size, KCenterSelection(pad_id, cfg.bf16_autocast))
            policy.restore(replay_items, pad_id)
        plugins.append(PlannedReplayPlugin(policy, cfg.seed + job.experience, make_dataset(rehearsal_items, pad_id)))

    # ---- train: one experience
    strategy = CausalLMStrategy(
        model=model,
        optimizer=optimizer,
        train_cfg=cfg,
        replay_cfg=replay_cfg,
        pad_id=pad_id,
        start_step=start_step,
        device=device,
        plugins=plugins,
    )
    experience = make_experience(make_dataset(new_items, pad_id), job.experience)
    train_started = time.perf_counter()
    strategy.train(experience, eval_streams=[])
    train_seconds = time.perf_counter() - train_started
    periodic = cfg.checkpoint_every and strategy.step % cfg.checkpoint_every == 0
    if stop_requested() or (strategy.step > start_step and not periodic):
        save(strategy)  # a kill during the finish below then resumes here, without redoing steps

    def stop_finishing() -> None:  # from here on the checkpoint holds the last step: a rerun only redoes the finish
        if stop_requested():
            raise Stopped(f"stopped after training step {strategy.step}; rerun the job to finish")

    stop_finishing()

    # ---- finish: Fisher of this generation folded into the running one, adapter, result
    fisher_seconds, fisher_meta = 0.0, None
    if ewc_cfg.fisher_examples > 0:
        t = time.perf_counter()
        folded = fold_fisher(fisher_in, _fisher(model, new_items, cfg, ewc_cfg, pad_id, stop_finishing), ewc_cfg.gamma)
        save_fisher(folded, workdir / jobs.FISHER_FILE)
        fisher_seconds, fisher_meta = time.perf_counter() - t, folded.meta
    _save_adapter(model, workdir / jobs.ADAPTER_DIR)

    steps_run = [h for h in history if h["step"] > start_step]
    tokens = sum(h["tokens"] for h in history)
    step_seconds = sum(h["step_s"] for h in history)
    result = {
        "steps": strategy.step,
        "resumed_from_step": start_step or None,
        "experience": job.experience,
        "examples": len(new_items),
        "examples_dropped_too_long": dropped,
        "replay_examples": len(replay_items),
        "replay_dropped_too_long": replay_dropped,
        "rehearsal_examples": len(rehearsal_items),
        "tokens": tokens,
        "target_tokens": sum(h["target_tokens"] for h in history),
        "padding_share": round(1 - tokens / max(sum(h["padded_tokens"] for h in history), 1), 4),
        "replayed_sequences": sum(h["replayed"] for h in history),
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": history[-1]["loss"] if history else None,
        "loss_last10_mean": _mean([h["loss"] for h in history[-10:]]),
        "ewc_penalty_last": history[-1]["ewc_penalty"] if history else None,
        "tokens_per_s": round(tokens / step_seconds, 1) if step_seconds else None,
        "step_s_median": _median([h["step_s"] for h in history]),
        "train_seconds_this_run": round(train_seconds, 2),
        "steps_this_run": len(steps_run),
        "fisher_seconds": round(fisher_seconds, 2),
        "fisher": jobs.FISHER_FILE if fisher_meta is not None else None,
        "fisher_representation": ewc_cfg.representation if fisher_meta is not None else None,
        "fisher_meta": fisher_meta,
        "ewc_applied": penalty is not None,
        "ewc_anchor": anchor if penalty is not None else None,
        "adapter": jobs.ADAPTER_DIR,
        "replay_buffer": buffer_members(policy) if policy is not None else [],
        "device": str(device),
        "threads": torch.get_num_threads(),
        "peak_rss_mb": jobs.peak_rss_mb(),
        "seconds_this_run": round(time.perf_counter() - started, 2),
    }
    jobs.atomic_write_json(workdir / jobs.RESULT_FILE, result)
    return result


def _fisher(model: Any, items: list[Any], cfg: TrainConfig, ewc_cfg: EwcConfig, pad_id: int,
            before_batch: Callable[[], None]) -> Any:
    """The diagonal Fisher of the target layers on a seeded sample of ``items`` (``ewc.fisher_examples``);
    ``before_batch`` is the stop check (it raises ``Stopped``)."""
    sample = [items[i] for i in fisher_sample(len(items), ewc_cfg.fisher_examples, cfg.seed)]
    print(f"estimating the Fisher on {len(sample)} examples", file=sys.stderr, flush=True)
    return estimate_fisher(model, sample, target_modules=cfg.target_modules, pad_id=pad_id,
                           batch_size=ewc_cfg.fisher_batch_size, representation=ewc_cfg.representation,
                           bf16=cfg.bf16_autocast, before_batch=before_batch)


def _save_adapter(model: Any, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


UNUSED_SOLVERS = ("jax", "jaxlib", "jaxopt")
"""Backends that qpsolvers (imported by Avalanche's GEM plugin, which we never use) tries at import: ~150 MB
and ~0.5 s of the worker's start. Its ``quadprog`` solver, GEM's own, does not need them."""


def skip_unused_solvers() -> None:
    """Make importing the ``UNUSED_SOLVERS`` fail fast (None in ``sys.modules``), so qpsolvers skips them as it
    skips any backend that is not installed. For the worker process only: it changes what the process can import."""
    for name in UNUSED_SOLVERS:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    skip_unused_solvers()

    def stopped() -> type[BaseException]:
        from .strategy import Stopped  # Avalanche: only once the SIGTERM handler is in place (see run_job)

        return Stopped

    return jobs.worker_main(argv, "selftune.learners.train", run_job, stopped=stopped,
                            summary=("steps", "loss_last", "tokens_per_s"))


if __name__ == "__main__":
    jobs.exit_now(main())
