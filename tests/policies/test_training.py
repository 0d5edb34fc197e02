"""The learner's config sections ([train], [replay], [ewc]): checks, dict round trip, learning-rate schedule."""

from __future__ import annotations

import pytest

from selftune.policies.errors import ConfigError
from selftune.policies.training import EwcConfig, ReplayConfig, TrainConfig, check, from_dict, learning_rate, to_dict


def test_defaults_are_valid() -> None:
    check(TrainConfig(), ReplayConfig(), EwcConfig())


def test_every_problem_is_listed_once_with_its_fix() -> None:
    with pytest.raises(ConfigError) as err:
        check(
            TrainConfig(lora_rank=0, learning_rate=-1.0, base_dtype="float16", target_modules=()),
            ReplayConfig(ratio=1.0, selection="random"),
            EwcConfig(gamma=1.5, representation="full", strength=-1.0),
        )
    problems = err.value.problems
    assert len(problems) == 9
    for needle in ("train.lora_rank = 0", "train.learning_rate = -1.0", "train.base_dtype = 'float16'",
                   "train.target_modules", "replay.ratio = 1.0", "replay.selection = 'random'",
                   "ewc.gamma = 1.5", "ewc.representation = 'full'", "ewc.strength = -1.0"):
        assert any(p.startswith(needle) for p in problems), needle


def test_negative_strength_is_a_problem() -> None:
    assert EwcConfig(strength=-1.0).problems() == ["ewc.strength = -1.0: use 0 (off) or a positive number, e.g. 1e3"]


def test_sections_round_trip_through_dicts() -> None:
    cfg = TrainConfig(target_modules=("q_proj", "v_proj"), steps=7)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown option"):
        from_dict(ReplayConfig, {"buffer_size": 3, "colour": "red"})


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=4, steps=20)
    rates = [learning_rate(s, cfg) for s in range(20)]
    assert rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert rates[4] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))
