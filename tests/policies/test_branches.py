"""A branch's effective configuration: the layers in their order, and every bad key or value refused."""

from __future__ import annotations

from dataclasses import replace

import pytest

from selftune.policies.branches import (
    SPECIALIST_DEFAULTS, apply_settings, changed_settings, effective_config, overrides, parse_value, restore,
    setting_types, without_setting,
)
from selftune.policies.config import Config
from selftune.policies.errors import ConfigError
from selftune.policies.gates import GateConfig
from selftune.policies.training import TrainConfig

GLOBAL = Config(gates=GateConfig(max_params_ratio=0.9, min_new_data_improvement=0.03), train=TrainConfig(steps=50))


def test_each_layer_overrides_the_one_below_global_specialist_table_stored() -> None:
    config = replace(GLOBAL, branches={"chem": {"gates.max_foundation_regression": 0.3, "train.steps": 70,
                                                "gates.max_params_ratio": 0.85}})
    stored = {"train.steps": 90}
    chem = effective_config(config, "chem", ("chemistry",), stored)
    assert chem.gates.min_new_data_improvement == 0.03  # global, no layer above sets it
    assert chem.pruning.enabled is True and chem.pruning.mlp_channel_fraction == 0.0  # specialist defaults
    assert chem.pruning.layer_dropping == "stepwise"
    assert chem.gates.max_foundation_drift == SPECIALIST_DEFAULTS["gates.max_foundation_drift"]
    assert chem.gates.max_foundation_regression == 0.3  # the table beats the specialist default
    assert chem.gates.max_params_ratio == 0.85  # the table beats the global file
    assert chem.train.steps == 90  # stored beats the table
    sources = {o.key: o.source for o in overrides(config, "chem", ("chemistry",), stored)}
    assert sources == {"train.steps": "branch set", "pruning.enabled": "specialist default",
                       "pruning.mlp_channel_fraction": "specialist default",
                       "pruning.layer_dropping": "specialist default", "pruning.layer_fraction": "specialist default",
                       "pruning.target_params_ratio": "specialist default",
                       "trim_vocab.enabled": "specialist default", "gates.max_foundation_regression": "configuration", "gates.max_foundation_drift":
                           "specialist default", "gates.max_params_ratio": "configuration"}


def test_a_branch_without_a_scope_gets_no_specialist_defaults() -> None:
    assert effective_config(GLOBAL, "main") == GLOBAL
    assert overrides(GLOBAL, "main") == []
    side = effective_config(GLOBAL, "side", (), {"pruning.enabled": True})
    assert side.pruning.enabled and side.gates.max_foundation_regression == GLOBAL.gates.max_foundation_regression


def test_the_specialist_defaults_are_valid_settings() -> None:
    assert set(SPECIALIST_DEFAULTS) <= set(setting_types())
    specialist = effective_config(Config(), "s", ("d",))
    assert changed_settings(specialist) == SPECIALIST_DEFAULTS


@pytest.mark.parametrize(("key", "text", "value"), [
    ("gates.max_params_ratio", "0.8", 0.8), ("gates.max_params_ratio", "1", 1.0), ("train.steps", "200", 200),
    ("pruning.enabled", "TRUE", True), ("cycle.auto_promote", "false", False), ("replay.selection", "diversity",
    "diversity"), ("train.target_modules", "q_proj, v_proj", ["q_proj", "v_proj"]),
    ("train.target_modules", '["o_proj"]', ["o_proj"]), ("train.learning_rate", "1e-4", 1e-4),
])
def test_values_are_parsed_with_the_settings_type(key: str, text: str, value: object) -> None:
    parsed = parse_value(key, text)
    assert parsed == value and type(parsed) is type(value)
    assert apply_settings(Config(), {key: parsed}) is not None


@pytest.mark.parametrize(("key", "text", "message"), [
    ("gates.max_param_ratio", "0.8", "no setting gates.max_param_ratio: did you mean gates.max_params_ratio?"),
    ("steps", "3", "no setting steps: did you mean train.steps?"),
    ("zzz", "3", "no setting 'zzz': keys are SECTION.KEY"),
    ("gates.nothing_like_it_at_all", "1", "[gates] has min_new_data_improvement"),
    ("server.port", "9000", "server.port is a service-wide setting, not a branch's: set it in [server]"),
    ("cycle.nice", "3", "cycle.nice is a service-wide setting"),
    ("pruning.enabled", "maybe", "pruning.enabled = 'maybe': expected true or false"),
    ("train.steps", "1.5", "train.steps = '1.5': expected a whole number"),
    ("gates.max_params_ratio", "inf", "use a finite number"),
    ("gates.max_params_ratio", "lots", "expected a number"),
])
def test_a_bad_key_or_value_is_refused_naming_it_and_the_fix(key: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_value(key, text)
    assert message in str(info.value)


def test_values_are_checked_together_by_the_configurations_own_checks() -> None:
    with pytest.raises(ConfigError, match="train.steps = 0: use 1 or more") as info:
        effective_config(Config(), "chem", (), {"train.steps": 0})
    assert "branch 'chem'" in str(info.value)
    with pytest.raises(ConfigError, match=r"replay.ratio \+ replay.rehearsal_ratio"):
        effective_config(Config(), "chem", (), {"replay.ratio": 0.5, "replay.rehearsal_ratio": 0.5})
    with pytest.raises(ConfigError, match="gates.max_params_ratio = 'x': expected a number"):
        apply_settings(Config(), {"gates.max_params_ratio": "x"})


def test_the_recorded_differences_rebuild_the_same_configuration() -> None:
    chem = effective_config(GLOBAL, "chem", ("chemistry",), {"train.target_modules": ["q_proj"]})
    assert restore(Config(), changed_settings(chem)) == chem
    assert restore(GLOBAL, {}) == Config()  # every per-branch setting from the record, none from the live file


def test_unsetting_a_setting_that_is_not_stored_names_the_stored_ones() -> None:
    assert without_setting({"train.steps": 3, "pruning.enabled": True}, "train.steps") == {"pruning.enabled": True}
    with pytest.raises(ConfigError, match="no stored setting gates.x: the branch's stored settings are pruning.ena"):
        without_setting({"pruning.enabled": True}, "gates.x")
