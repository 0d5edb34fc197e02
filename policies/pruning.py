"""Pruning decisions: which adapter rank to keep, and which MLP channels and decoder layers to remove.

The learners measure (singular values, per-channel importance, per-layer block influence); these
functions decide over those plain numbers. Stdlib only, no I/O.
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


@dataclass(frozen=True)
class PruningConfig:
    enabled: bool = False
    """Remove MLP channels and decoder layers after the merge. Off keeps the parent's shape."""
    mlp_channel_fraction: float = 0.25
    """Share of MLP intermediate channels removed, the same count in every layer."""
    layer_fraction: float = 0.2
    """Share of decoder layers removed (rounded down), the least influential first."""
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
    """LoRA heal after the surgery: a training job of this many steps on the pruned model, on the cycle's new
    rows and the same replay pool, merged in (EWC off: the running Fisher has the parent's shapes); 0 skips it."""

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
        return out


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
    kept_layers = tuple(i for i in range(n) if i not in removed)
    keep = kept_channel_count(width, config.mlp_channel_fraction, config.channel_multiple)
    kept_channels = tuple(top_channels(channel_scores[i], keep) for i in kept_layers)
    reason = (
        f"remove {len(removed)} of {n} layers (least block influence: {list(removed)}) and keep {keep} of "
        f"{width} MLP channels in each remaining layer"
    )
    return PruningPlan(n, width, kept_layers, removed, kept_channels, reason)


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
