"""Pruning decisions: which adapter rank to keep, which MLP channels and decoder layers to remove, and how to heal.

The learners measure (singular values, per-channel importance, per-layer block influence, the specialty's
held-out loss after each removal); these functions decide over those plain numbers. Stdlib only, no I/O.

Two ways to drop layers (``PruningConfig.layer_dropping``):
- "fraction": the ``layer_fraction`` least influential layers at once, scored once (``plan_pruning``);
- "stepwise": one layer at a time, re-scored on the traffic after each removal, the specialty's loss checked
  between removals (``next_layer_to_drop`` picks, ``within_prune_budget`` judges; the learner loops).
The heal after the surgery trains the layers next to each cut (``heal_layers``) on a warm-up then cosine
learning rate (``heal_learning_rate``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterTrimConfig:
    rank: int = 0
    """Largest rank kept per LoRA layer after an SVD of ``B @ A``; 0 keeps the adapter's own rank."""
    energy: float = 1.0
    """Keep the smallest rank whose singular values hold this share of the squared spectrum (1.0 keeps all)."""
    keep_fraction: float = 1.0
    """Magnitude trim: share of the largest-magnitude entries of each weight change kept (1.0 keeps all)."""

    def problems(self) -> list[str]:
        out = []
        if self.rank < 0:
            out.append(f"trim.rank = {self.rank}: use 0 (keep the adapter's rank) or a positive rank")
        if not 0.0 < self.energy <= 1.0:
            out.append(f"trim.energy = {self.energy}: use a share in (0, 1]; 1.0 keeps every direction")
        if not 0.0 < self.keep_fraction <= 1.0:
            out.append(f"trim.keep_fraction = {self.keep_fraction}: use a share in (0, 1]; 1.0 keeps all")
        return out

    @property
    def trims_anything(self) -> bool:
        return self.rank > 0 or self.energy < 1.0 or self.keep_fraction < 1.0


LAYER_DROPPING: tuple[str, ...] = ("fraction", "stepwise")
HEAL_KINDS: tuple[str, ...] = ("lora", "distill")


@dataclass(frozen=True)
class PruningConfig:
    enabled: bool = False
    """Remove MLP channels and decoder layers after the merge. Off keeps the parent's shape."""
    mlp_channel_fraction: float = 0.25
    """Share of MLP intermediate channels removed, the same count in every layer (0 keeps the width). Measured
    on SmolLM2-135M: width pruning does not recover on a CPU-sized heal, so specialists keep it at 0."""
    layer_fraction: float = 0.2
    """Share of decoder layers removed (rounded down), the least influential first; with "stepwise" dropping,
    the most that may be removed."""
    layer_dropping: str = "fraction"
    """How layers are chosen: "fraction" removes ``layer_fraction`` of them at once, scored once; "stepwise"
    removes the least influential one, re-scores on the traffic, checks the specialty's held-out loss, and
    goes on until ``max_drop_cost``, ``target_params_ratio``, ``layer_fraction`` or ``min_layers`` stops it
    (it needs held-out rows)."""
    max_drop_cost: float = 0.02
    """Stepwise dropping: the specialty's held-out loss may end at most this share above the model's before the
    first removal (0.02 = 2%); the removal that would pass it is undone and dropping stops there. Checked
    before the heal, which wins some of it back; what the finished candidate may cost against the unpruned one
    is the gate ``gates.max_prune_cost``. On SmolLM2-135M (hacker_jargon, from generation 0) the least
    influential layer alone costs +2.8%, so 2% drops nothing there; 8% dropped layers 14, 13, 17 (+7.3%)."""
    target_params_ratio: float = 0.0
    """Stepwise dropping stops once parameters / the unpruned model's are at most this (0: no size target)."""
    min_layers: int = 2
    """Never leave fewer decoder layers than this."""
    protected_edge_layers: int = 1
    """The first and the last this-many layers are never removed (they read the embeddings and write the logits)."""
    channel_multiple: int = 8
    """The kept intermediate size is rounded up to a multiple of this, so that matmuls stay aligned."""
    score_samples: int = 64
    """Traffic sequences used to score channels and layers (the branch's own logged interactions)."""
    score_max_tokens: int = 256
    """Each scoring sequence is cut to this many tokens."""
    heal_steps: int = 60
    """Optimizer steps of the heal after the surgery (0 skips it), on the cycle's new rows and the replay pool."""
    heal_kind: str = "lora"
    """"lora": a LoRA training job on the pruned model with cross-entropy, merged in (EWC off: the running
    Fisher has the parent's shapes). "distill": KL divergence to the unpruned model's next-token distribution,
    full weights of the layers next to each cut and the norms above them (``selftune.learners.heal``).
    Measured (SmolLM2-135M without layers 13, 14, 17, hacker_jargon, 40 steps of 4 rows, 1 thread): the
    held-out loss went from +7.3% over the unpruned model to -3.2% with "lora" (4.3 s a step) and to +3.6%
    with "distill" (5.8 s a step; its target is the unpruned model, here the untuned foundation, so it cannot
    go below it, while LoRA also learns the domain). So "lora" stays the default, specialists included."""
    heal_learning_rate: float = 1e-4
    """Distillation heal: peak learning rate, reached after ``heal_warmup_steps``."""
    heal_min_learning_rate: float = 1e-5
    """Distillation heal: the learning rate decays (cosine) from the peak to this at the last step."""
    heal_warmup_steps: int = 5
    """Distillation heal: steps of linear warm-up to the peak learning rate."""

    def problems(self) -> list[str]:
        out = []
        if not 0.0 <= self.mlp_channel_fraction < 1.0:
            out.append(f"pruning.mlp_channel_fraction = {self.mlp_channel_fraction}: use a share in [0, 1)")
        if not 0.0 <= self.layer_fraction < 1.0:
            out.append(f"pruning.layer_fraction = {self.layer_fraction}: use a share in [0, 1)")
        if self.min_layers < 1:
            out.append(f"pruning.min_layers = {self.min_layers}: use 1 or more")
        if self.protected_edge_layers < 0:
            out.append(f"pruning.protected_edge_layers = {self.protected_edge_layers}: use 0 or more")
        if self.channel_multiple < 1:
            out.append(f"pruning.channel_multiple = {self.channel_multiple}: use 1 or more (8 or 64 are usual)")
        if self.score_samples < 1:
            out.append(f"pruning.score_samples = {self.score_samples}: use 1 or more")
        if self.heal_steps < 0:
            out.append(f"pruning.heal_steps = {self.heal_steps}: use 0 (no heal) or a positive step count, e.g. 60")
        if self.score_max_tokens < 2:
            out.append(f"pruning.score_max_tokens = {self.score_max_tokens}: use 2 or more")
        if self.layer_dropping not in LAYER_DROPPING:
            out.append(f"pruning.layer_dropping = {self.layer_dropping!r}: use one of {', '.join(LAYER_DROPPING)}")
        if not (math.isfinite(self.max_drop_cost) and self.max_drop_cost >= 0.0):
            out.append(f"pruning.max_drop_cost = {self.max_drop_cost}: use 0 (no loss allowed) or a share, e.g. 0.02")
        if not 0.0 <= self.target_params_ratio < 1.0:
            out.append(f"pruning.target_params_ratio = {self.target_params_ratio}: use 0 (no size target) or a "
                       "ratio below 1, e.g. 0.8")
        if self.heal_kind not in HEAL_KINDS:
            out.append(f"pruning.heal_kind = {self.heal_kind!r}: use one of {', '.join(HEAL_KINDS)}")
        for name in ("heal_learning_rate", "heal_min_learning_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 < value <= 1.0):
                out.append(f"pruning.{name} = {value}: use a value in (0, 1], e.g. 1e-4 (peak) or 1e-5 (end)")
        if self.heal_min_learning_rate > self.heal_learning_rate:
            out.append(f"pruning.heal_min_learning_rate = {self.heal_min_learning_rate} is above pruning."
                       f"heal_learning_rate = {self.heal_learning_rate}: the rate decays to it, so keep it at or below")
        if self.heal_warmup_steps < 0:
            out.append(f"pruning.heal_warmup_steps = {self.heal_warmup_steps}: use 0 or more")
        return out


SPECIALIST_PRUNING = PruningConfig(
    enabled=True, mlp_channel_fraction=0.0, layer_fraction=0.5, layer_dropping="stepwise", heal_kind="lora",
)
"""The pruning a specialist branch starts from: stepwise layer dropping within a 2% budget on its specialty
(up to half the layers), no width pruning (it does not recover on a small model), the heal that measured
better (``heal_kind``)."""


@dataclass(frozen=True)
class PruningPlan:
    """What to keep. Layer indices are the parent's; ``kept_channels[i]`` belongs to ``kept_layers[i]``."""

    num_layers_before: int
    intermediate_size_before: int
    kept_layers: tuple[int, ...]
    removed_layers: tuple[int, ...]
    kept_channels: tuple[tuple[int, ...], ...]
    reason: str

    @property
    def num_layers_after(self) -> int:
        return len(self.kept_layers)

    @property
    def intermediate_size_after(self) -> int:
        return len(self.kept_channels[0]) if self.kept_channels else self.intermediate_size_before

    @property
    def changes_anything(self) -> bool:
        return bool(self.removed_layers) or self.intermediate_size_after < self.intermediate_size_before


def rank_for_energy(singular_values: Sequence[float], energy: float, max_rank: int = 0) -> int:
    """The smallest rank whose leading singular values hold ``energy`` of the squared spectrum.

    ``max_rank`` (0 = no cap) caps the answer; at least rank 1 is kept unless every value is zero.
    """
    values = sorted((float(s) for s in singular_values), reverse=True)
    if not values:
        return 0
    bad = [s for s in values if not math.isfinite(s)]
    if bad:
        raise ValueError(f"singular values contain {bad[0]}: the weight change is non-finite, refuse to trim it")
    total = sum(s * s for s in values)
    cap = len(values) if max_rank <= 0 else min(max_rank, len(values))
    if total == 0.0:
        return min(1, cap)
    running = 0.0
    for rank, s in enumerate(values, start=1):
        running += s * s
        # A small tolerance so that energy=1.0 does not keep directions that only hold rounding error.
        if running >= energy * total * (1.0 - 1e-12) or rank >= cap:
            return min(rank, cap)
    return cap


def kept_channel_count(intermediate_size: int, fraction: float, multiple: int) -> int:
    """How many channels stay: remove ``fraction`` (rounded down), then round up to ``multiple``."""
    keep = intermediate_size - math.floor(intermediate_size * fraction)
    keep = math.ceil(keep / multiple) * multiple
    return max(1, min(keep, intermediate_size))


def layers_to_remove(layer_scores: Sequence[float], config: PruningConfig) -> tuple[int, ...]:
    """The least influential layers, never an edge layer and never below ``min_layers``."""
    n = len(layer_scores)
    edge = config.protected_edge_layers
    candidates = [i for i in range(edge, n - edge)]
    count = min(math.floor(n * config.layer_fraction), max(0, n - config.min_layers), len(candidates))
    ranked = sorted(candidates, key=lambda i: (layer_scores[i], i))
    return tuple(sorted(ranked[:count]))


def top_channels(scores: Sequence[float], keep: int) -> tuple[int, ...]:
    """Indices of the ``keep`` highest scores (ties go to the lower index), in ascending order."""
    ranked = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return tuple(sorted(ranked[:keep]))


def plan_pruning(
    channel_scores: Sequence[Sequence[float]], layer_scores: Sequence[float], config: PruningConfig
) -> PruningPlan:
    """Decide what to keep from per-layer channel importance and per-layer block influence.

    ``channel_scores[i][j]``: importance of MLP channel ``j`` in layer ``i``; ``layer_scores[i]``: how
    much layer ``i`` changes its input (higher = more influential). Both are measured on traffic.
    """
    _check_scores(channel_scores, layer_scores)
    n = len(layer_scores)
    width = len(channel_scores[0])
    if not config.enabled:
        every = tuple(range(width))
        return PruningPlan(n, width, tuple(range(n)), (), tuple(every for _ in range(n)), "pruning is disabled")
    removed = layers_to_remove(layer_scores, config)
    return plan_for_layers(channel_scores, tuple(i for i in range(n) if i not in removed), config,
                           f"least block influence: {list(removed)}")


def plan_for_layers(
    channel_scores: Sequence[Sequence[float]], kept_layers: Sequence[int], config: PruningConfig, why: str
) -> PruningPlan:
    """The plan that keeps ``kept_layers`` (the parent's indices) and the top channels of each.

    ``channel_scores`` has one row per layer of the parent (rows of removed layers are not read). ``why``
    says how the layers were chosen, for the plan's reason.
    """
    n, width = len(channel_scores), len(channel_scores[0])
    kept = tuple(sorted(kept_layers))
    if not kept or kept[0] < 0 or kept[-1] >= n or len(set(kept)) != len(kept):
        raise ValueError(f"kept layers {list(kept_layers)} are not distinct layers of a {n}-layer model")
    removed = tuple(i for i in range(n) if i not in kept)
    keep = kept_channel_count(width, config.mlp_channel_fraction, config.channel_multiple)
    kept_channels = tuple(top_channels(channel_scores[i], keep) for i in kept)
    reason = (f"remove {len(removed)} of {n} layers ({why}) and keep {keep} of {width} MLP channels in each "
              "remaining layer")
    return PruningPlan(n, width, kept, removed, kept_channels, reason)


# ---- stepwise layer dropping ---------------------------------------------------------------------


@dataclass(frozen=True)
class LayerDropChoice:
    """The next layer to try removing (the parent's index), or None and why dropping stops."""

    layer: int | None
    reason: str


def max_layers_removed(num_layers: int, config: PruningConfig) -> int:
    """How many layers may go at most: ``layer_fraction`` of them (rounded down), leaving ``min_layers``."""
    inner = max(0, num_layers - 2 * config.protected_edge_layers)
    return max(0, min(math.floor(num_layers * config.layer_fraction), num_layers - config.min_layers, inner))


def next_layer_to_drop(
    layer_scores: Sequence[float], kept_layers: Sequence[int], num_layers: int, params_ratio: float,
    config: PruningConfig,
) -> LayerDropChoice:
    """Stepwise dropping: the least influential layer that may still go, or why none may.

    ``layer_scores[k]`` is the block influence of ``kept_layers[k]`` (the parent's index of the model's
    k-th remaining layer), measured on the traffic after the previous removals; ``params_ratio`` is the
    model's parameters now over the unpruned model's. The first and last ``protected_edge_layers`` of
    the parent are never chosen; ties go to the lower index.
    """
    if len(layer_scores) != len(kept_layers):
        raise ValueError(f"{len(layer_scores)} layer scores for {len(kept_layers)} remaining layers: score the "
                         "model as it is now")
    for layer, score in zip(kept_layers, layer_scores):
        if not math.isfinite(score):
            raise ValueError(f"layer {layer} has block influence {score}: the model produces non-finite activations")
    removed = num_layers - len(kept_layers)
    if config.target_params_ratio > 0 and params_ratio <= config.target_params_ratio:
        return LayerDropChoice(None, f"size target reached: {params_ratio:.3f} of the parameters left, target "
                                     f"{config.target_params_ratio:g}")
    if removed >= max_layers_removed(num_layers, config):
        return LayerDropChoice(None, f"{removed} of {num_layers} layers removed: the most that layer_fraction = "
                                     f"{config.layer_fraction:g}, min_layers = {config.min_layers} and the "
                                     f"{config.protected_edge_layers} protected edge layer(s) allow")
    edge = config.protected_edge_layers
    candidates = [(score, layer) for layer, score in zip(kept_layers, layer_scores) if edge <= layer < num_layers - edge]
    if not candidates:
        return LayerDropChoice(None, "only protected edge layers are left")
    score, layer = min(candidates)
    return LayerDropChoice(layer, f"layer {layer} has the least block influence ({score:.4g}) of the removable ones")


def within_prune_budget(loss: float, unpruned_loss: float, max_cost: float) -> bool:
    """Whether a pruned model's held-out loss is at most ``max_cost`` (a share) above the unpruned one's.

    A non-finite loss never is. The comparison is relative, so per-token and per-byte losses give the same
    answer as long as both models read the same tokens (layer dropping does not change the vocabulary).
    """
    if not (math.isfinite(loss) and math.isfinite(unpruned_loss)):
        return False
    return loss <= unpruned_loss + abs(unpruned_loss) * max_cost


# ---- the heal ------------------------------------------------------------------------------------


def heal_layers(num_layers_before: int, removed_layers: Sequence[int], channels_cut: bool = False) -> tuple[int, ...]:
    """The pruned model's layers (its own indices) next to a cut: each run of removed layers brings the
    remaining layer just below it and the one just above it. With ``channels_cut`` every layer lost MLP
    channels, so every layer is next to a cut. Empty when nothing was cut (nothing to heal).
    """
    removed = set(removed_layers)
    if any(not 0 <= r < num_layers_before for r in removed):
        raise ValueError(f"removed layers {sorted(removed)} are not layers of a {num_layers_before}-layer model")
    kept = [i for i in range(num_layers_before) if i not in removed]
    if channels_cut:
        return tuple(range(len(kept)))
    neighbours = set()
    for position, layer in enumerate(kept):
        below_cut = layer + 1 in removed
        above_cut = layer - 1 in removed
        if below_cut or above_cut:
            neighbours.add(position)
    return tuple(sorted(neighbours))


def heal_learning_rate(step: int, steps: int, config: PruningConfig) -> float:
    """Learning rate of heal step ``step`` (0-based): linear warm-up to ``heal_learning_rate`` over
    ``heal_warmup_steps``, then a cosine decay to ``heal_min_learning_rate`` at the last step. A function of
    the step alone, so a resumed heal needs no scheduler state."""
    peak, low, warmup = config.heal_learning_rate, config.heal_min_learning_rate, config.heal_warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(steps - 1 - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_scores(channel_scores: Sequence[Sequence[float]], layer_scores: Sequence[float]) -> None:
    if not layer_scores:
        raise ValueError("no layer scores: score the model on some traffic before planning")
    if len(channel_scores) != len(layer_scores):
        raise ValueError(
            f"{len(channel_scores)} rows of channel scores for {len(layer_scores)} layers: give one row per layer"
        )
    widths = {len(row) for row in channel_scores}
    if len(widths) != 1 or 0 in widths:
        raise ValueError(f"channel score rows have lengths {sorted(widths)}: every layer needs one score per channel")
    for i, score in enumerate(layer_scores):
        if not math.isfinite(score):
            raise ValueError(f"layer {i} has block influence {score}: the model produces non-finite activations")
    for i, row in enumerate(channel_scores):
        if not all(math.isfinite(s) for s in row):
            raise ValueError(f"layer {i} has non-finite channel importance: the model produces non-finite activations")
