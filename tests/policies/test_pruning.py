"""The pruning policy: energy-kept adapter rank, the layer and channel plan, kept channel counts (pure, no torch)."""

from __future__ import annotations

import math

import pytest

from selftune.policies.pruning import PruningConfig, kept_channel_count, plan_pruning, rank_for_energy


def test_rank_for_energy() -> None:
    assert rank_for_energy([3.0, 2.0, 1.0, 0.0], 1.0) == 3  # a zero direction is never needed
    assert rank_for_energy([3.0, 2.0, 1.0], 0.9) == 2  # 9 + 4 = 13 of 14 -> 92.9%
    assert rank_for_energy([3.0, 2.0, 1.0], 0.5) == 1
    assert rank_for_energy([3.0, 2.0, 1.0], 1.0, max_rank=2) == 2
    assert rank_for_energy([0.0, 0.0], 0.9) == 1
    with pytest.raises(ValueError, match="non-finite"):
        rank_for_energy([1.0, math.nan], 0.9)


def test_plan_removes_the_least_influential_inner_layers_and_the_same_channel_count_everywhere() -> None:
    config = PruningConfig(enabled=True, mlp_channel_fraction=0.5, layer_fraction=0.34, channel_multiple=1,
                           protected_edge_layers=1, min_layers=2)
    layer_scores = [0.01, 0.5, 0.05, 0.3, 0.2, 0.02]  # layers 0 and 5 are the lowest but protected
    channel_scores = [[float((i + j) % 4) for j in range(4)] for i in range(6)]
    plan = plan_pruning(channel_scores, layer_scores, config)
    assert plan.removed_layers == (2, 4)
    assert plan.kept_layers == (0, 1, 3, 5)
    assert plan.num_layers_after == 4 and plan.intermediate_size_after == 2
    # Layer 1's scores are [1, 2, 3, 0]: channels 1 and 2 stay.
    assert plan.kept_channels[1] == (1, 2)
    assert {len(c) for c in plan.kept_channels} == {2}
    assert plan.changes_anything


def test_plan_respects_min_layers_and_disabled() -> None:
    scores = [[1.0] * 16 for _ in range(3)]
    plan = plan_pruning(scores, [0.1, 0.2, 0.3], PruningConfig(enabled=True, layer_fraction=0.9, min_layers=2,
                                                            protected_edge_layers=0))
    assert plan.num_layers_after == 2 and plan.removed_layers == (0,)
    off = plan_pruning(scores, [0.1, 0.2, 0.3], PruningConfig(enabled=False, layer_fraction=0.9))
    assert not off.changes_anything and off.reason == "pruning is disabled"
    with pytest.raises(ValueError, match="layer 1 has block influence nan"):
        plan_pruning(scores, [0.1, math.nan, 0.3], PruningConfig(enabled=True))
    with pytest.raises(ValueError, match="one row per layer"):
        plan_pruning(scores[:2], [0.1, 0.2, 0.3], PruningConfig(enabled=True))


def test_kept_channel_count_rounds_up_to_the_multiple() -> None:
    assert kept_channel_count(1536, 0.25, 64) == 1152
    assert kept_channel_count(1536, 0.3, 64) == 1088  # 1076 -> 1088
    assert kept_channel_count(128, 0.99, 8) == 8
    assert PruningConfig(mlp_channel_fraction=1.0, channel_multiple=0).problems() != []
