"""Avalanche pieces for LoRA on a causal LM: the strategy, replay, EWC, progress and checkpoint plugins.

Importing this module imports ``avalanche.training`` (~7 s, ~230 MB): only the training worker
(``selftune.learners.train``) does, never the daemon's API or CLI process.

Whose is what:
* Avalanche's: the training loop and its plugin callbacks (``SupervisedTemplate``), the experience and
  stream (``DatasetExperience``, ``EagerCLStream``), datasets (``AvalancheDataset``), the replay plugin
  and its storage policies (``ReplayPlugin``; the buffers themselves are in ``replay``).
* Ours: the causal-LM overrides of the template (dict batches, logits on labelled positions only, a
  shifted token loss, an optimizer of the trainable parameters, warm-up/decay and clipping), the batch
  plan that puts an exact replay share in every batch (``policies.replay``), the EWC plugin for LoRA
  (``fisher.EwcPenalty``), progress and checkpoints.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience
from avalanche.benchmarks.scenarios.generic_scenario import EagerCLStream
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
from avalanche.training.storage_policy import ExemplarsBuffer
from avalanche.training.templates import SupervisedTemplate

from selftune.policies.replay import PlannedBatch, plan_batches
from selftune.policies.training import ReplayConfig, TrainConfig, learning_rate

from .data import Encoded, EncodedDataset, pad_collate
from .fisher import EwcPenalty
from .lm import autocast, mixed_token_loss, target_logits, target_replay_mask, to_device


class Stopped(Exception):
    """Training stopped on request (SIGTERM) after writing a checkpoint; rerun the job to resume."""


def make_dataset(items: Sequence[Encoded], pad_id: int, replay: bool = False) -> AvalancheDataset:
    return AvalancheDataset([EncodedDataset(items, replay=replay)], collate_fn=pad_collate(pad_id))


def make_experience(dataset: AvalancheDataset, experience: int) -> DatasetExperience:
    """One experience per cycle, inside a one-experience stream (without it Avalanche fails with
    "origin_stream not set"); the stream renumbers it, so the cycle's number is set back after."""
    exp = DatasetExperience(dataset=dataset, current_experience=experience)
    EagerCLStream("train", [exp])
    exp.current_experience = experience
    return exp


class PlannedLoader:
    """The planned batches from ``start`` on: new and replayed items collated together."""

    def __init__(self, new: Any, replay: Any | None, plan: Sequence[PlannedBatch], start: int, pad_id: int) -> None:
        if replay is None and any(b.replay for b in plan):
            raise ValueError("the batch plan replays examples but no replay buffer was given")
        self.new, self.replay, self.plan, self.start = new, replay, plan, start
        self.collate = pad_collate(pad_id)

    def __len__(self) -> int:
        return max(len(self.plan) - self.start, 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for planned in self.plan[self.start :]:
            items = [self.new[i] for i in planned.new] + [_as_replay(self.replay[j]) for j in planned.replay]
            yield self.collate(items)


def _silent_evaluator() -> EvaluationPlugin:
    """An evaluator without metrics (the default's accuracy metric crashes on LM logits) or loggers
    (progress.jsonl is the log); Avalanche warns about the missing loggers, which is the point."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return EvaluationPlugin()


def _as_replay(item: dict[str, Any]) -> dict[str, Any]:
    return {**item, "replay": True}


class CausalLMStrategy(SupervisedTemplate):
    """``SupervisedTemplate`` for a causal LM with a LoRA adapter (the pattern of Avalanche's HF example).

    Fixes for Avalanche 0.6.0 (see AVALANCHE.md): batches are dicts, not tuples (``mb_x``, ``mb_y``,
    ``mb_task_id``, ``_unpack_minibatch``); ``forward`` returns the logits of labelled positions under
    autocast and ``criterion`` is the shifted token loss; the train loader is ours (the stock one ignores
    the dataset's collate); the optimizer keeps only the trainable parameters (the stock
    ``make_optimizer`` would add every frozen weight).
    """

    def __init__(
        self,
        *,
        model: Any,
        optimizer: torch.optim.Optimizer,
        train_cfg: TrainConfig,
        replay_cfg: ReplayConfig,
        pad_id: int,
        start_step: int = 0,
        device: torch.device,
        plugins: Sequence[SupervisedPlugin] = (),
    ) -> None:
        super().__init__(
            model=model,
            optimizer=optimizer,
            train_mb_size=train_cfg.batch_size,
            train_epochs=1,
            eval_mb_size=train_cfg.batch_size,
            device=device,
            plugins=list(plugins),
            evaluator=_silent_evaluator(),
            eval_every=-1,
        )
        self.cfg = train_cfg
        self.replay_cfg = replay_cfg
        self.pad_id = pad_id
        self.step = start_step
        self.plan: list[PlannedBatch] = []
        self.ewc_penalty = 0.0
        self._targets: torch.Tensor | None = None
        self.optimized_param_id = {}  # marks the optimizer as set up: make_optimizer must not rebuild it

    # ---- minibatch: dicts instead of tuples
    @property
    def mb_x(self) -> torch.Tensor:
        return self.mbatch["input_ids"]

    @property
    def mb_y(self) -> torch.Tensor:
        return self.mbatch["labels"]

    @property
    def mb_task_id(self) -> torch.Tensor:
        return torch.zeros(self.mbatch["input_ids"].shape[0], dtype=torch.long, device=self.device)

    def _unpack_minibatch(self) -> None:
        self.mbatch = to_device(self.mbatch, self.device)

    # ---- model
    def forward(self) -> torch.Tensor:
        with autocast(self.device, self.cfg.bf16_autocast):
            logits, self._targets = target_logits(self.model, self.mbatch)
        return logits

    def criterion(self) -> torch.Tensor:
        """Token loss, replayed sequences weighing their share of the batch (``lm.mixed_token_loss``)."""
        replay = self.mbatch["replay"]
        share = float(replay.sum()) / len(replay)
        return mixed_token_loss(self.mb_output, self._targets, target_replay_mask(self.mbatch), share)

    def make_optimizer(self, **kwargs: Any) -> None:
        """Keep the optimizer as built: over the adapter's parameters only, its state possibly resumed."""

    def optimizer_step(self) -> None:
        lr = learning_rate(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.cfg.max_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.step += 1

    # ---- data
    def plan_for(self, replay_lengths: Sequence[int], rehearsal_lengths: Sequence[int] = ()) -> list[PlannedBatch]:
        assert self.adapted_dataset is not None
        new_lengths = [len(self.adapted_dataset[i]["input_ids"]) for i in range(len(self.adapted_dataset))]
        enabled = self.replay_cfg.enabled
        self.plan = plan_batches(
            new_lengths,
            replay_lengths,
            steps=self.cfg.steps,
            batch_size=self.cfg.batch_size,
            ratio=self.replay_cfg.ratio if enabled else 0.0,
            seed=self.cfg.seed,
            bucket_steps=self.cfg.bucket_steps,
            rehearsal_lengths=rehearsal_lengths,
            rehearsal_ratio=self.replay_cfg.rehearsal_ratio if self.replay_cfg.buffer_size > 0 else 0.0,
        )
        return self.plan

    def make_train_dataloader(self, **kwargs: Any) -> None:
        """Our planned loader (replaced by the replay plugin when the buffer holds anything)."""
        self.dataloader = PlannedLoader(self.adapted_dataset, None, self.plan_for([]), self.step, self.pad_id)


class PlannedReplayPlugin(ReplayPlugin):
    """Avalanche's ``ReplayPlugin`` with its storage policy, but our batches and the non-deprecated update.

    The stock ``ReplayDataLoader`` draws memory batches at random on top of ``train_mb_size``; ours follows
    the seeded plan, so every batch holds exactly ``round(batch_size * ratio)`` replayed sequences and a
    resumed run sees the same batches. Fixed rows (``rehearsal``) are replayed at their own share beside the
    buffer but never enter it. After the experience the buffer is updated through ``post_adapt`` (the stock
    ``update`` is deprecated and resets the warning filters on every call).
    """

    def __init__(self, storage_policy: ExemplarsBuffer, seed: int, rehearsal: AvalancheDataset | None = None) -> None:
        super().__init__(mem_size=storage_policy.max_size, storage_policy=storage_policy)
        self.seed = seed
        self.rehearsal = rehearsal

    def before_training_exp(self, strategy: CausalLMStrategy, **kwargs: Any) -> None:
        buffer, rehearsal = self.storage_policy.buffer, self.rehearsal
        pool = buffer.concat(rehearsal) if rehearsal is not None and len(rehearsal) else buffer
        if len(pool) == 0:
            return
        lengths = [len(pool[i]["input_ids"]) for i in range(len(pool))]
        plan = strategy.plan_for(lengths[: len(buffer)], lengths[len(buffer):])
        strategy.dataloader = PlannedLoader(strategy.adapted_dataset, pool, plan, strategy.step, strategy.pad_id)

    def after_training_exp(self, strategy: CausalLMStrategy, **kwargs: Any) -> None:
        torch.manual_seed(self.seed)  # the reservoir draws its keys with torch.rand: same seed, same buffer
        self.storage_policy.post_adapt(strategy, strategy.experience)


class EwcLoraPlugin(SupervisedPlugin):
    """EWC on the effective weight change of LoRA layers (not Avalanche's ``EWCPlugin``, which anchors
    every parameter's own value and has a zero Fisher on a fresh adapter).

    After each backward, the penalty's closed-form gradient is added to the adapters' gradients and its
    value is recorded as ``strategy.ewc_penalty`` (the logged loss stays the data loss).
    """

    def __init__(self, penalty: EwcPenalty) -> None:
        super().__init__()
        self.penalty = penalty

    def after_backward(self, strategy: CausalLMStrategy, **kwargs: Any) -> None:
        strategy.ewc_penalty = self.penalty.apply(add_grad=True)


class ProgressPlugin(SupervisedPlugin):
    """Per-step record (step, loss, EWC penalty, tokens, tokens/s, lr, replayed sequences), appended to
    ``progress.jsonl`` every ``every`` steps and kept in ``history`` for the checkpoint and the result."""

    def __init__(self, path: Path, every: int, history: list[dict[str, Any]]) -> None:
        super().__init__()
        self.path, self.every, self.history = path, every, history
        self._t0 = 0.0

    def before_training_iteration(self, strategy: CausalLMStrategy, **kwargs: Any) -> None:
        self._t0 = time.perf_counter()

    def after_training_iteration(self, strategy: CausalLMStrategy, **kwargs: Any) -> None:
        seconds = time.perf_counter() - self._t0
        batch = strategy.mbatch
        tokens = int(batch["attention_mask"].sum())
        record = {
            "step": strategy.step,
            "loss": round(float(strategy.loss.detach()), 6),
            "ewc_penalty": round(float(strategy.ewc_penalty), 8),
            "lr": learning_rate(strategy.step - 1, strategy.cfg),
            "tokens": tokens,
            "target_tokens": int((batch["labels"] != -100).sum()),
            "padded_tokens": int(batch["attention_mask"].numel()),
            "sequences": int(batch["input_ids"].shape[0]),
            "replayed": int(batch["replay"].sum()),
            "step_s": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        }
        self.history.append(record)
        if strategy.step % self.every == 0 or strategy.step == strategy.cfg.steps:
            append_jsonl(self.path, record)


class CheckpointPlugin(SupervisedPlugin):
    """Writes the resumable state every ``every`` steps and when a stop was requested (then stops)."""

    def __init__(self, save: Callable[[CausalLMStrategy], None], every: int, stop_requested: Callable[[], bool]) -> None:
        super().__init__()
        self.save, self.every, self.stop_requested = save, every, stop_requested

    def after_training_iteration(self, strategy: CausalLMStrategy, **kwargs: Any) -> None:
        stopping = self.stop_requested()
        if stopping or (self.every and strategy.step % self.every == 0):
            self.save(strategy)
        if stopping:
            raise Stopped(f"stopped at step {strategy.step} of {strategy.cfg.steps}; rerun the job to resume")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
