"""Avalanche pieces for LoRA on a causal LM: the strategy, replay, EWC, progress and checkpoint plugins.

Importing this module imports ``avalanche.training`` (~7 s, ~230 MB): only the training worker
(``selftune.learners.train``) does, never the daemon's API or CLI process.

Whose is what:
* Avalanche's: the training loop and its plugin callbacks (``SupervisedTemplate``), the experience and
  stream (``DatasetExperience``, ``EagerCLStream``), datasets (``AvalancheDataset``), the replay plugin
  and its storage policies (``ReplayPlugin``, ``ReservoirSamplingBuffer`` for "reservoir",
  ``ParametricBuffer`` grouped by experience for "diversity").
* Ours: the causal-LM overrides of the template (dict batches, logits on labelled positions only, a
  shifted token loss, an optimizer of the trainable parameters, warm-up/decay and clipping), the batch
  plan that puts an exact replay share in every batch (``policies.replay``), the k-center selection of
  the diversity buffer, the EWC plugin for LoRA (``fisher.EwcPenalty``), progress and checkpoints.
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
from avalanche.training.storage_policy import (
    ExemplarsBuffer,
    ExemplarsSelectionStrategy,
    ParametricBuffer,
    ReservoirSamplingBuffer,
    _ParametricSingleBuffer,
)
from avalanche.training.templates import SupervisedTemplate

from selftune.policies.replay import PlannedBatch, plan_batches
from selftune.policies.training import ReplayConfig, TrainConfig, learning_rate

from .data import Encoded, EncodedDataset, batches, pad_collate
from .fisher import EwcPenalty
from .lm import autocast, decoder, mixed_token_loss, target_logits, target_replay_mask, to_device


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


def reservoir_buffer(max_size: int, items: Sequence[Encoded], pad_id: int) -> ReservoirSamplingBuffer:
    """Avalanche's reservoir buffer, restored from persisted rows: their priorities are its random keys."""
    buf = ReservoirSamplingBuffer(max_size)
    ordered = sorted(items, key=lambda it: -it.priority)  # the buffer keeps its keys sorted, descending
    if ordered:
        buf.buffer = make_dataset(ordered, pad_id)
        buf._buffer_weights = torch.tensor([it.priority for it in ordered], dtype=torch.float32)
    return buf


class KCenterSelection(ExemplarsSelectionStrategy):
    """Diversity: farthest-first traversal of the model's mean-pooled last hidden states.

    The first pick is the example closest to the mean; each next one is the example farthest from all
    picked so far, so any prefix is a greedy k-center cover of the group (a 2-approximation). Features
    are cached by row id for the life of the process. (A full-order traversal needs one distance update per
    pick, a matrix-vector product: plain torch does it; a faiss index would not make it cheaper.)
    """

    def __init__(self, pad_id: int, bf16: bool, batch_size: int = 16) -> None:
        self.pad_id, self.bf16, self.batch_size = pad_id, bf16, batch_size
        self._cache: dict[Any, torch.Tensor] = {}

    def make_sorted_indices(self, strategy: Any, data: AvalancheDataset) -> list[int]:
        items = [data[i] for i in range(len(data))]
        feats = self.features(strategy.model, items, strategy.device)
        return farthest_first(feats)

    @torch.no_grad()
    def features(self, model: Any, items: list[dict[str, Any]], device: torch.device) -> torch.Tensor:
        missing = [it for it in items if _key(it) not in self._cache]
        if missing:
            encoded = [Encoded(it["input_ids"], it["labels"], _key(it)) for it in missing]
            was_training = model.training
            model.eval()
            try:
                for batch in batches(encoded, self.batch_size, self.pad_id):
                    batch = to_device(batch, device)
                    with autocast(device, self.bf16):
                        hidden = decoder(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    mask = batch["attention_mask"].unsqueeze(-1).float()
                    pooled = (hidden.last_hidden_state.float() * mask).sum(1) / mask.sum(1)
                    for key, vec in zip(batch["ids"], pooled.cpu()):
                        self._cache[key] = vec
            finally:
                model.train(was_training)
        return torch.stack([self._cache[_key(it)] for it in items])


def _key(item: dict[str, Any]) -> Any:
    return (item.get("experience"), item.get("id"), tuple(item["input_ids"][:8]), len(item["input_ids"]))


def farthest_first(features: torch.Tensor) -> list[int]:
    """Order of a farthest-first traversal (deterministic: ties go to the lower index)."""
    n = features.shape[0]
    if n == 0:
        return []
    x = features.double()
    first = int(torch.argmin((x - x.mean(0)).square().sum(1)))
    order = [first]
    nearest = (x - x[first]).square().sum(1)
    nearest[first] = -1.0
    for _ in range(n - 1):
        pick = int(torch.argmax(nearest))
        order.append(pick)
        nearest = torch.minimum(nearest, (x - x[pick]).square().sum(1))
        nearest[order] = -1.0
    return order


class ExperienceDiversityBuffer(ParametricBuffer):
    """Avalanche's ``ParametricBuffer`` grouped by experience, with k-center selection inside each group.

    Two changes: the group of new data is the cycle's experience number (the stock one counts the
    experiences this process has trained, always 1 in a fresh worker), and groups can be restored from
    persisted rows.
    """

    def __init__(self, max_size: int, selection: KCenterSelection) -> None:
        super().__init__(max_size, groupby="experience", selection_strategy=selection)

    def _split_by_experience(self, strategy: Any, data: AvalancheDataset) -> dict[int, AvalancheDataset]:
        return {int(strategy.experience.current_experience): data}

    def restore(self, items: Sequence[Encoded], pad_id: int) -> None:
        groups: dict[int, list[Encoded]] = {}
        for it in sorted(items, key=lambda it: (it.experience, -it.priority)):
            groups.setdefault(it.experience, []).append(it)
        for exp, members in groups.items():
            single = _ParametricSingleBuffer(len(members), self.selection_strategy)
            single.buffer = make_dataset(members, pad_id)
            self.buffer_groups[exp] = single
            self.seen_groups.add(exp)


def buffer_members(policy: ExemplarsBuffer) -> list[dict[str, Any]]:
    """What the buffer holds after the update: ``{"id", "experience", "priority"}`` per row, for storage.

    Reservoir priorities are the random keys (higher stays longer); diversity priorities are
    ``1 / (1 + rank)`` within the experience's group (rank 0 = first pick).
    """
    out = []
    if isinstance(policy, ReservoirSamplingBuffer):
        buf = policy.buffer
        for i in range(len(buf)):
            item = buf[i]
            out.append({"id": item["id"], "experience": int(item["experience"]), "priority": float(policy._buffer_weights[i])})
    elif isinstance(policy, ParametricBuffer):
        for exp, group in policy.buffer_groups.items():
            for rank in range(len(group.buffer)):
                item = group.buffer[rank]
                out.append({"id": item["id"], "experience": int(exp), "priority": 1.0 / (1.0 + rank)})
    return out


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
