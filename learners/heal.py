"""The distillation heal: a pruned model (the student) trained back towards the unpruned one (the teacher).

``python -m selftune.learners.heal WORKDIR`` runs a job written by ``write_heal_job``, like the training
worker (``learners.jobs``): same file names, same progress lines, same exit codes, so ``jobs.TrainingRun``
watches and stops it (``start_heal`` returns one) and ``jobs.read_result``/``read_failure`` read it.

The working directory holds ``job.json`` (student and teacher directories, ``out_dir``, the cut, the
``[pruning]`` and ``[train]`` settings), ``train.jsonl``/``replay.jsonl``/``rehearsal.jsonl`` (the rows),
``kept_ids.json`` (optional, see below); it gets ``progress.jsonl`` (one line per step: step, loss = the KL,
lr, tokens, tokens_per_s, step_s), ``checkpoint/state.pt`` (``learners.checkpoint``: trained weights,
optimizer, RNG, step; written every ``train.checkpoint_every`` steps and on SIGTERM, after which the worker
exits with ``jobs.EXIT_STOPPED``; rerunning resumes bit-for-bit, the batches and learning rate being functions
of the seed and the step), then the healed model in ``out_dir`` and ``result.json``, or ``failed.json``.

What it optimises, and why:
- **Loss**: KL(teacher || student) of the next-token distribution, no cross-entropy term: the teacher's
  soft targets carry what the cut layers computed, where one-hot labels would pull the student towards
  the rows themselves (and away from the candidate the gates compare it with). The teacher's logits are
  restricted to ``kept_ids`` (the teacher ids the student kept, in the student's order) before its softmax,
  so a trimmed vocabulary is distilled on the tokens it can still produce.
- **Positions**: every non-padding position, prompts and template included, not only the assistant's
  tokens. The forward passes compute them all anyway; the student's hidden states at prompt positions are
  the keys and values the answer attends to, so matching the teacher there heals the answer too; and a
  short heal gets several times more supervised positions per step (lower-variance gradients) for little
  extra cost. It also works on rows without an assistant turn.
- **Trained weights**: full weights (not LoRA) of the layers next to each cut (``policies.pruning.
  heal_layers``), every norm from the lowest of them up, and the final norm; everything else is frozen,
  so autograd stops at the lowest trained layer (embeddings and the layers below get no backward pass).
  Norms below it are left alone because training them would make the backward pass run to the bottom.
- **Schedule**: AdamW, linear warm-up to ``pruning.heal_learning_rate`` (1e-4) then cosine to
  ``pruning.heal_min_learning_rate`` (1e-5), ``pruning.heal_steps`` steps, gradients clipped at
  ``train.max_grad_norm``; batches of ``train.batch_size`` rows planned as training plans them
  (``policies.replay.plan_batches``: seeded, length-bucketed) over the branch's training rows, its replay
  pool and the rehearsal rows together (the teacher gives every row its targets, so no row is "new").
- **Precision**: the trained weights and optimizer in float32; autocast and a bfloat16 teacher only where
  ``lm.fast_bf16`` says the hardware computes bfloat16. The healed model is written in the student's own
  dtype with its frozen weights copied bit for bit from the student directory.
- **NaN guard**: a step whose loss is non-finite, or a heal that ends with a non-finite trained weight,
  raises ``merge.NonFiniteWeightsError`` naming the weight; the worker records it in ``failed.json``
  (``non_finite_layer``) and ``heal_failure`` turns that back into the same error for the cycle to reject.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from selftune.policies.pruning import PruningConfig, heal_layers, heal_learning_rate
from selftune.policies.replay import plan_batches
from selftune.policies.training import TrainConfig, from_dict, to_dict

from . import checkpoint, jobs
from .data import EncodedDataset, encode_rows, pad_collate, read_rows
from .lm import autocast, decoder, fast_bf16, load_base, load_tokenizer, pick_device, set_threads
from .merge import NonFiniteWeightsError

KEPT_IDS_FILE = "kept_ids.json"
HEALED_DIR = "model"
"""Where the healed model goes when the job names no ``out_dir``."""
NORM_CLASS_SUFFIXES = ("RMSNorm", "LayerNorm")


class HealStopped(Exception):
    """The heal stopped on request after writing its checkpoint; rerun it to resume."""


@dataclass(frozen=True)
class HealJob:
    student: str
    """The pruned model directory (its tokenizer encodes the rows)."""
    teacher: str
    """The unpruned candidate the student was cut from."""
    out_dir: str
    """Where the healed model is written (a transformers directory, tokenizer included)."""
    num_layers_before: int
    """The teacher's decoder layers (``layers_before`` of the prune report)."""
    removed_layers: tuple[int, ...]
    """The teacher's indices of the removed layers (``layers_removed`` of the prune report)."""
    channels_cut: bool = False
    """Whether MLP channels were cut too (then every layer is next to a cut)."""
    pruning: PruningConfig = field(default_factory=PruningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kept_ids_given: bool = False
    """Whether ``kept_ids.json`` maps the student's vocabulary into the teacher's (else they are the same)."""

    @property
    def trained_layers(self) -> tuple[int, ...]:
        return heal_layers(self.num_layers_before, self.removed_layers, self.channels_cut)


def write_heal_job(
    workdir: str | Path,
    *,
    student: str | Path,
    teacher: str | Path,
    prune_report: dict[str, Any],
    train_rows: Iterable[dict[str, Any]],
    replay_rows: Iterable[dict[str, Any]] = (),
    rehearsal_rows: Iterable[dict[str, Any]] = (),
    pruning: PruningConfig | None = None,
    train: TrainConfig | None = None,
    kept_ids: Sequence[int] | None = None,
    out_dir: str | Path | None = None,
) -> Path:
    """Write a heal job: the student (pruned) and teacher (unpruned) directories, the cut as ``prune_report``
    (``learners.prune``'s report: ``layers_before``, ``layers_removed``, ``intermediate_size_*``) says, the
    rows, and the settings (``pruning.heal_*``; batch size, sequence length, seed, threads, checkpointing and
    clipping from ``train``). ``kept_ids``: the teacher's ids the student kept, in the student's order (None:
    the same vocabulary). The healed model goes to ``out_dir`` (default ``WORKDIR/model``)."""
    pruning, train = pruning or PruningConfig(), train or TrainConfig()
    problems = pruning.problems() + train.problems()
    if pruning.heal_steps < 1:
        problems.append(f"pruning.heal_steps = {pruning.heal_steps}: a heal job needs 1 step or more (0 skips the heal)")
    if problems:
        raise ValueError("; ".join(problems))
    workdir = Path(workdir)
    job = HealJob(
        student=str(student), teacher=str(teacher), out_dir=str(out_dir or workdir.resolve() / HEALED_DIR),
        num_layers_before=int(prune_report["layers_before"]), removed_layers=tuple(prune_report["layers_removed"]),
        channels_cut=prune_report.get("intermediate_size_after", 0) < prune_report.get("intermediate_size_before", 0),
        pruning=pruning, train=train, kept_ids_given=kept_ids is not None,
    )
    if not job.trained_layers:
        raise ValueError("the prune report removed no layer and no channel: there is nothing to heal, skip the heal")
    workdir.mkdir(parents=True, exist_ok=True)
    rows = {jobs.TRAIN_FILE: train_rows, jobs.REPLAY_FILE: replay_rows, jobs.REHEARSAL_FILE: rehearsal_rows}
    for name, items in rows.items():
        jobs.atomic_write_text(workdir / name, "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in items))
    if kept_ids is not None:
        jobs.atomic_write_text(workdir / KEPT_IDS_FILE, json.dumps([int(i) for i in kept_ids]))
    doc = {"kind": "distill", "student": job.student, "teacher": job.teacher, "out_dir": job.out_dir,
           "num_layers_before": job.num_layers_before, "removed_layers": list(job.removed_layers),
           "channels_cut": job.channels_cut, "kept_ids_given": job.kept_ids_given,
           "pruning": to_dict(pruning), "train": to_dict(train)}  # type: ignore[arg-type]
    jobs.atomic_write_json(workdir / jobs.JOB_FILE, doc)
    return workdir


def read_heal_job(workdir: str | Path) -> HealJob:
    path = Path(workdir) / jobs.JOB_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: write the job with selftune.learners.heal.write_heal_job first")
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("kind") != "distill":
        raise ValueError(f"{path} is not a distillation heal job (kind {doc.get('kind')!r}): run it with its own worker")
    return HealJob(student=doc["student"], teacher=doc["teacher"], out_dir=doc["out_dir"],
                   num_layers_before=int(doc["num_layers_before"]), removed_layers=tuple(doc["removed_layers"]),
                   channels_cut=bool(doc["channels_cut"]), pruning=from_dict(PruningConfig, doc["pruning"]),
                   train=from_dict(TrainConfig, doc["train"]), kept_ids_given=bool(doc["kept_ids_given"]))


def start_heal(workdir: str | Path, *, python: str | None = None, env: dict[str, str] | None = None) -> jobs.TrainingRun:
    """Start ``python -m selftune.learners.heal WORKDIR`` in its own session (output to ``train.log``, the name
    the training job uses); ``stop()`` checkpoints it, starting it again resumes."""
    workdir = Path(workdir).resolve()
    read_heal_job(workdir)  # fail here, in the caller, on a missing or invalid job
    with open(workdir / jobs.LOG_FILE, "ab") as log:
        process = subprocess.Popen(
            [python or sys.executable, "-m", "selftune.learners.heal", str(workdir)], stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(workdir), env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    return jobs.TrainingRun(workdir, process)


def heal_failure(workdir: str | Path) -> Exception | None:
    """The failure of a heal worker as an exception to raise: ``NonFiniteWeightsError`` if its weights went
    non-finite (the cycle rejects the candidate), else a ``RuntimeError``; None if it did not fail."""
    failure = jobs.read_failure(workdir)
    if failure is None:
        return None
    if failure.get("non_finite_layer"):
        return NonFiniteWeightsError(failure["non_finite_layer"], failure.get("non_finite_detail", "non-finite weights"))
    return RuntimeError(f"heal failed: {failure.get('error')}; see {Path(workdir) / jobs.LOG_FILE}")


# ---- the loss and the trained parameters ---------------------------------------------------------


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), both ``(positions, vocabulary)``, in float32."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1),
                    log_target=True, reduction="batchmean")


def trained_parameter_names(model: Any, layers: Sequence[int]) -> list[str]:
    """Every parameter of ``layers`` (the model's own indices), every norm of the layers above the lowest of
    them, and the final norm (the norms below would lengthen the backward pass to the bottom)."""
    if not layers:
        raise ValueError("no layer to heal: nothing was cut")
    body = decoder(model)
    prefix = {id(p): n for n, p in model.named_parameters()}
    names: list[str] = []
    for index, layer in enumerate(body.layers):
        if index in layers:
            names += [prefix[id(p)] for p in layer.parameters()]
        elif index > min(layers):
            names += [prefix[id(p)] for m in layer.modules() if _is_norm(m) for p in m.parameters(recurse=False)]
    final = getattr(body, "norm", None)
    if final is not None:
        names += [prefix[id(p)] for p in final.parameters()]
    return names


def teacher_head(teacher: Any, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's output head restricted to the kept vocabulary: its rows ``kept``, in the student's order,
    so that its softmax runs over the tokens the student can produce (computed once, not per step)."""
    head = teacher.get_output_embeddings()
    return head.weight.detach()[kept], head.bias.detach()[kept] if head.bias is not None else None


def teacher_ids(kept: torch.Tensor, student_ids: torch.Tensor) -> torch.Tensor:
    """The student's token ids as the teacher's: the rows are encoded once, by the student's tokenizer."""
    return kept[student_ids]


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(NORM_CLASS_SUFFIXES)


def _logits(model: Any, batch: dict[str, torch.Tensor], head_weight: torch.Tensor, head_bias: torch.Tensor | None,
            ids: torch.Tensor) -> torch.Tensor:
    """Logits at the non-padding positions (the output head run only there)."""
    hidden = decoder(model)(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    return F.linear(hidden[batch["attention_mask"].bool()], head_weight, head_bias)


# ---- the job -------------------------------------------------------------------------------------


def run_heal(workdir: str | Path, stop_requested: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Run (or resume, or return the result of) the heal job in ``workdir``; returns ``result.json``."""
    workdir = Path(workdir)
    done = jobs.read_result(workdir)
    if done is not None:
        return done
    job = read_heal_job(workdir)
    (workdir / jobs.FAILED_FILE).unlink(missing_ok=True)
    cfg, steps = job.train, job.pruning.heal_steps
    started = time.perf_counter()
    if stop_requested():
        raise HealStopped("stopped before the heal began; rerun the job to resume")

    # ---- setup: data, teacher, student, trained parameters, resume
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = pick_device()
    bf16 = cfg.bf16_autocast and fast_bf16(device.type)
    tokenizer = load_tokenizer(job.student)
    rows = [r for name in (jobs.TRAIN_FILE, jobs.REPLAY_FILE, jobs.REHEARSAL_FILE)
            if (workdir / name).exists() for r in read_rows(workdir / name)]
    items, dropped = encode_rows(tokenizer, rows, cfg.max_length)
    if not items:
        raise ValueError(f"{workdir}: none of its {len(rows)} rows has an assistant turn within max_length="
                         f"{cfg.max_length} tokens; add rows or raise train.max_length")
    plan = plan_batches([len(i.input_ids) for i in items], [], steps=steps, batch_size=cfg.batch_size, ratio=0.0,
                        seed=cfg.seed, bucket_steps=cfg.bucket_steps)

    teacher = load_base(job.teacher, base_dtype=cfg.base_dtype if bf16 else "float32", device=device).eval()
    teacher.requires_grad_(False)
    # frozen linears stored as training stores them (bf16 only where computed in hardware), trained ones float32
    student = load_base(job.student, base_dtype=cfg.base_dtype if bf16 else "float32", device=device)
    student.train()
    vocab = student.get_output_embeddings().weight.shape[0]
    kept = _kept_ids(workdir, job, vocab, teacher.get_output_embeddings().weight.shape[0]).to(device)
    head_weight, head_bias = teacher_head(teacher, kept)
    student_head = student.get_output_embeddings()

    names = set(trained_parameter_names(student, job.trained_layers))
    student.requires_grad_(False)
    params = [(n, p) for n, p in student.named_parameters() if n in names]
    for _, p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=job.pruning.heal_learning_rate, weight_decay=0.0)
    fingerprint = checkpoint.fingerprint(workdir, (jobs.JOB_FILE, jobs.TRAIN_FILE, jobs.REPLAY_FILE,
                                                   jobs.REHEARSAL_FILE, KEPT_IDS_FILE))
    history: list[dict[str, Any]] = []
    start_step = checkpoint.resume(workdir, fingerprint, params, optimizer, history, kind="heal job")
    collate, dataset = pad_collate(tokenizer.pad_token_id), EncodedDataset(items)

    def save(step: int) -> None:
        checkpoint.save(workdir, step, steps, params, optimizer, history, fingerprint)

    # ---- heal
    for step in range(start_step, steps):
        if stop_requested():
            save(step)
            raise HealStopped(f"stopped before heal step {step + 1}; rerun the job to resume")
        t = time.perf_counter()
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate([dataset[i] for i in plan[step].new]).items()}
        with torch.no_grad(), autocast(device, bf16):
            target = _logits(teacher, batch, head_weight, head_bias, teacher_ids(kept, batch["input_ids"]))
        with autocast(device, bf16):
            logits = _logits(student, batch, student_head.weight, student_head.bias, batch["input_ids"])
        loss = distill_loss(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lr = heal_learning_rate(step, steps, job.pruning)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.max_grad_norm)
        optimizer.step()
        kl = float(loss.detach())
        if not math.isfinite(kl):
            _check_finite(params, f"heal step {step + 1} had a non-finite KL ({kl})")
        tokens = int(batch["attention_mask"].sum())
        seconds = time.perf_counter() - t
        history.append({"step": step + 1, "loss": round(kl, 6), "lr": lr, "tokens": tokens,
                        "sequences": len(plan[step].new), "step_s": round(seconds, 4),
                        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None})
        if (step + 1) % cfg.progress_every == 0 or step + 1 == steps:
            checkpoint.append_progress(workdir, history[-1])
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save(step + 1)
    if steps > start_step and not (cfg.checkpoint_every and steps % cfg.checkpoint_every == 0):
        save(steps)  # a kill while writing the model below then resumes here, without redoing steps

    # ---- finish: the NaN guard, then the student's own weights with the trained ones put in
    _check_finite(params, f"the distillation heal left non-finite values after {steps} steps (diverged: lower "
                          "pruning.heal_learning_rate)")
    trained = {n: p.detach().cpu() for n, p in params}
    del teacher, student, optimizer
    _save_healed(job, trained, Path(job.out_dir))
    result = {
        "kind": "distill",
        "steps": steps,
        "resumed_from_step": start_step or None,
        "examples": len(items),
        "examples_dropped_too_long": dropped,
        "trained_layers": list(job.trained_layers),
        "trained_parameters": sum(t.numel() for t in trained.values()),
        "trained_tensors": len(trained),
        "vocabulary": vocab,
        "tokens": sum(h["tokens"] for h in history),
        "loss_first": history[0]["loss"] if history else None,
        "loss_last": history[-1]["loss"] if history else None,
        "loss_last10_mean": round(sum(h["loss"] for h in history[-10:]) / max(len(history[-10:]), 1), 6),
        "tokens_per_s": round(sum(h["tokens"] for h in history) / max(sum(h["step_s"] for h in history), 1e-9), 1),
        "step_s_median": statistics.median(h["step_s"] for h in history) if history else None,
        "steps_this_run": steps - start_step,
        "out_dir": job.out_dir,
        "threads": torch.get_num_threads(),
        "seconds_this_run": round(time.perf_counter() - started, 2),
    }
    jobs.atomic_write_json(workdir / jobs.RESULT_FILE, result)
    return result


def _kept_ids(workdir: Path, job: HealJob, student_vocab: int, teacher_vocab: int) -> torch.Tensor:
    if not job.kept_ids_given:
        if student_vocab != teacher_vocab:
            raise ValueError(f"the student has {student_vocab} output rows and the teacher {teacher_vocab}: pass "
                             "kept_ids (the teacher's ids the student kept, in its order) to write_heal_job")
        return torch.arange(student_vocab)
    kept = json.loads((workdir / KEPT_IDS_FILE).read_text())
    if len(kept) != student_vocab or (kept and not 0 <= min(kept) <= max(kept) < teacher_vocab):
        raise ValueError(f"{workdir / KEPT_IDS_FILE} maps {len(kept)} ids into a teacher of {teacher_vocab}, the "
                         f"student has {student_vocab} output rows: give one teacher id per student id")
    return torch.tensor(kept, dtype=torch.long)


def _check_finite(params: Sequence[tuple[str, torch.Tensor]], detail: str) -> None:
    for name, p in params:
        finite = torch.isfinite(p)
        if not bool(finite.all()):
            nan = int(torch.isnan(p).sum())
            what = f"{detail}: {nan} NaN and {int((~finite).sum()) - nan} Inf value(s)"
            error = NonFiniteWeightsError(name, what)
            error.detail = what  # type: ignore[attr-defined]  # for failed.json, so heal_failure rebuilds it
            raise error


def _save_healed(job: HealJob, trained: dict[str, torch.Tensor], out: Path) -> None:
    """The student as stored (its dtype, its frozen weights untouched) with the trained tensors put in."""
    model = AutoModelForCausalLM.from_pretrained(job.student, dtype="auto")
    state = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in trained.items():
            state[name].copy_(tensor.to(state[name].dtype))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(job.student).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    return jobs.worker_main(argv, "selftune.learners.heal", run_heal, stopped=lambda: HealStopped,
                            summary=("steps", "loss_first", "loss_last", "tokens_per_s"), failure=_failure_fields)


def _failure_fields(error: BaseException) -> dict[str, Any]:
    """``failed.json``'s fields from which ``heal_failure`` rebuilds a ``NonFiniteWeightsError``."""
    if isinstance(error, NonFiniteWeightsError):
        return {"non_finite_layer": error.layer, "non_finite_detail": getattr(error, "detail", str(error))}
    return {}


if __name__ == "__main__":
    jobs.exit_now(main())
