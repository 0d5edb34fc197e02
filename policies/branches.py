"""A branch's effective configuration: the global one, then specialist defaults, its table, its own settings.

A branch's cycles run with the global ``Config`` overridden in this order, each later layer winning:

1. the global configuration (``selftune.toml`` and the ``SELFTUNE_...`` environment overrides);
2. ``SPECIALIST_DEFAULTS``, for a specialist (a branch with a scope: the domains routed to it);
3. the branch's ``[branches.NAME]`` table of the configuration file;
4. the settings stored with the branch by ``selftune branch set NAME KEY VALUE``.

Stored settings win over the file, so ``branch set`` takes effect at the next cycle without editing it;
``selftune branch unset NAME KEY`` hands the key back to the file (and the layers below it).

Keys are ``"section.key"`` of the sections a branch may change (``BRANCH_SECTIONS``), e.g.
``"gates.max_params_ratio"``, ``"pruning.enabled"``, ``"train.steps"``. A value is checked against the
field's type, then the whole result against the same checks as the global configuration
(``Config.__post_init__``), so a bad key or value is refused, naming it and the fix, before anything is
stored. Stdlib only, no I/O.
"""

from __future__ import annotations

import difflib
import json
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from .config import SECTIONS, Config, field_types, value_problem
from .errors import ConfigError

BRANCH_SECTIONS: tuple[str, ...] = ("cycle", "selection", "train", "replay", "ewc", "trim", "trim_vocab", "pruning",
                                     "gates")
"""The sections a branch may override; the others (storage, model, ingest, server, schedule) are the service's."""
SERVICE_WIDE: frozenset[str] = frozenset({"cycle.nice"})
"""Keys of those sections that only the service reads (the worker's niceness is set before the branch's
settings are read), so a branch cannot have its own."""

SPECIALIST_DEFAULTS: dict[str, Any] = {
    "pruning.enabled": True,
    "pruning.layer_dropping": "stepwise",
    "pruning.layer_fraction": 0.5,
    "pruning.mlp_channel_fraction": 0.0,
    "pruning.target_params_ratio": 0.8,
    "trim_vocab.enabled": True,
    "gates.max_foundation_regression": 0.5,
    "gates.max_foundation_drift": 1.0,
}
"""What a specialist changes of the global configuration unless its table or its own settings say otherwise.

- It prunes (a specialist is smaller because it drops what its specialty does not use): first the vocabulary
  its traffic and general text do not use (``trim_vocab``; SmolLM2-135M spends 21% of its parameters on a
  49,152-token embedding), then stepwise layer dropping (one layer at a time, up to half of them), stopping at
  80% of the unpruned size or once its specialty's held-out loss would rise by more than
  ``pruning.max_drop_cost`` (2%, the trim and the cuts together) before the heal, which is the budget the gate
  ``gates.max_prune_cost`` holds the healed candidate to. Measured on SmolLM2-135M (hacker_jargon, 930 rows,
  ``bench/bench_specialists.py``): an 8% pre-heal budget cut to 0.795 of the parameters (13,539 tokens, layers
  13 and 14) at +18% held-out loss after a 60-step LoRA heal, which the gates rejected; MLP channel pruning off (width pruning of a small, heavily trained model
  does not recover on a CPU-sized heal: ``bench/bench_pruning_plans.py`` measured +206% foundation loss
  after a 100-step heal). Its earlier experiences outside its scope are measured, not gated.
- Its foundation probe is measured and reported, and blocks only a model the surgery broke: the probe loss
  may rise by up to half of its parent's (``max_foundation_regression`` 0.5, against the generalist's 5%)
  and up to twice generation 0's over the lineage (``max_foundation_drift`` 1.0, else the generalist's 25%
  cumulative budget would block first). Giving up some general ability for its specialty is the point of
  a specialist; a collapsed model (several times the loss, or non-finite) still fails. Its own specialty
  is guarded by the new-data and earlier-experience gates, which keep the generalist's thresholds.
"""

SOURCES = ("global", "specialist default", "configuration", "branch set")
"""Where a branch's setting comes from, lowest to highest precedence (``Override.source``)."""


@dataclass(frozen=True)
class Override:
    """One setting of a branch that differs from the global configuration, and the layer it comes from."""

    key: str
    value: Any
    """JSON-ready (a list for a tuple)."""
    global_value: Any
    source: str
    """One of ``SOURCES`` (never "global")."""


def setting_types() -> dict[str, Any]:
    """Every key a branch may set, ``"section.key"`` -> the field's type."""
    return {f"{section}.{name}": kind for section in BRANCH_SECTIONS for name, kind in field_types(section).items()
            if f"{section}.{name}" not in SERVICE_WIDE}


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a setting a branch may have (with the fix), or None."""
    known = setting_types()
    if key in known:
        return None
    section, dot, name = key.partition(".")
    if key in SERVICE_WIDE or (dot and section in SECTIONS and name in field_types(section)):
        return f"{key} is a service-wide setting, not a branch's: set it in [{section}] of the configuration"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"no setting {key}: did you mean {close[0]}?"
    if not dot:
        return f"no setting {key!r}: keys are SECTION.KEY, e.g. gates.max_params_ratio"
    if section not in BRANCH_SECTIONS:
        return f"no setting {key}: a branch may set keys of {', '.join(BRANCH_SECTIONS)}"
    return f"no setting {key}: [{section}] has {', '.join(field_types(section))}"


def parse_value(key: str, text: str) -> Any:
    """The value a user typed (``branch set``) as the setting's type; ``ConfigError`` names what is wrong.

    Booleans are ``true``/``false``; numbers as ``3`` or ``0.5`` or ``1e-4`` (finite); lists as
    ``a,b,c`` or a JSON list ``["a", "b"]``; strings as they are.
    """
    problem = key_problem(key)
    if problem is not None:
        raise ConfigError([problem], source="branch setting")
    expected = setting_types()[key]
    value: Any = text
    if expected is bool:
        value = {"true": True, "false": False}.get(text.strip().lower(), text)
    elif expected is int:
        try:
            value = int(text.strip())
        except ValueError:
            pass
    elif expected is float:
        try:
            value = float(text.strip())
        except ValueError:
            pass
    elif typing.get_origin(expected) is tuple:
        try:
            listed = text.strip().startswith("[")
            value = json.loads(text) if listed else [part.strip() for part in text.split(",") if part.strip()]
        except json.JSONDecodeError:
            pass
    problem = value_problem(value, expected) or _finite_problem(value)
    if problem is not None:
        raise ConfigError([f"{key} = {text!r}: {problem}"], source="branch setting")
    return _json_ready(value)


def settings_problems(settings: Mapping[str, Any]) -> list[str]:
    """Every key or value of ``settings`` that a branch cannot have (types only; ``apply_settings`` checks
    the values together)."""
    out = []
    for key, value in settings.items():
        problem = key_problem(key)
        if problem is None and (problem := value_problem(value, setting_types()[key])) is not None:
            problem = f"{key} = {value!r:.60}: {problem}"
        if problem is not None:
            out.append(problem)
    return out


def apply_settings(config: Config, settings: Mapping[str, Any], source: str = "branch settings") -> Config:
    """``config`` with ``settings`` applied; ``ConfigError`` (naming ``source``) lists every problem."""
    problems = settings_problems(settings)
    if problems:
        raise ConfigError(problems, source=source)
    by_section: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        section, _, name = key.partition(".")
        by_section.setdefault(section, {})[name] = _typed(value, setting_types()[key])
    try:
        return replace(config, **{s: replace(getattr(config, s), **values) for s, values in by_section.items()})
    except ConfigError as exc:  # Config.__post_init__: the same checks as the global configuration
        raise ConfigError(exc.problems, source=source) from None


def layers(config: Config, name: str, domains: Sequence[str] = (),
           stored: Mapping[str, Any] | None = None) -> list[tuple[str, Mapping[str, Any]]]:
    """The override layers of branch ``name`` above the global configuration, lowest first, by source."""
    out: list[tuple[str, Mapping[str, Any]]] = []
    if domains:
        out.append(("specialist default", SPECIALIST_DEFAULTS))
    out.append(("configuration", config.branches.get(name, {})))
    out.append(("branch set", stored or {}))
    return out


def effective_config(config: Config, name: str, domains: Sequence[str] = (),
                     stored: Mapping[str, Any] | None = None) -> Config:
    """The configuration branch ``name`` (with scope ``domains`` and stored settings) runs its cycles with."""
    merged: dict[str, Any] = {}
    for _, layer in layers(config, name, domains, stored):
        merged.update(layer)
    return apply_settings(config, merged, source=f"settings of branch {name!r}")


def overrides(config: Config, name: str, domains: Sequence[str] = (),
              stored: Mapping[str, Any] | None = None) -> list[Override]:
    """The branch's settings that differ from the global configuration, each with the layer it comes from."""
    effective = effective_config(config, name, domains, stored)
    source_of = {key: source for source, layer in layers(config, name, domains, stored) for key in layer}
    differing = changed_settings(effective, config)
    return [Override(key, value, _json_ready(_get(config, key)), source_of.get(key, "global"))
            for key, value in differing.items()]


def changed_settings(config: Config, base: Config | None = None) -> dict[str, Any]:
    """The per-branch settings of ``config`` that differ from ``base`` (the defaults if None), JSON-ready,
    in section order: what a generation's manifest records, and what ``branch list`` shows."""
    base = base or Config()
    out = {}
    for section in BRANCH_SECTIONS:
        ours, theirs = getattr(config, section), getattr(base, section)
        for f in fields(ours):
            key = f"{section}.{f.name}"
            if key not in SERVICE_WIDE and getattr(ours, f.name) != getattr(theirs, f.name):
                out[key] = _json_ready(getattr(ours, f.name))
    return out


def restore(config: Config, changed: Mapping[str, Any]) -> Config:
    """The inverse of ``changed_settings``: ``config`` with every per-branch setting at its default but those
    in ``changed`` (what a cycle recorded); the service-wide settings stay ``config``'s."""
    defaults = Config()
    return apply_settings(config, {**{key: _get(defaults, key) for key in setting_types()}, **changed},
                          source="recorded branch settings")


def with_setting(stored: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A branch's stored settings with ``key`` set (``value`` from ``parse_value``)."""
    return {**stored, key: value}


def without_setting(stored: Mapping[str, Any], key: str) -> dict[str, Any]:
    """A branch's stored settings without ``key``; ``ConfigError`` if it has no such stored setting."""
    if key not in stored:
        have = ", ".join(sorted(stored)) or "none"
        raise ConfigError([f"no stored setting {key}: the branch's stored settings are {have}"],
                          source="branch setting")
    return {k: v for k, v in stored.items() if k != key}


def _get(config: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def _typed(value: Any, expected: Any) -> Any:
    """A JSON or TOML value as the field holds it: a tuple for a list, a float for a whole number."""
    if typing.get_origin(expected) is tuple:
        return tuple(value)
    if expected is float:
        return float(value)
    return value


def _json_ready(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def _finite_problem(value: Any) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return "use a finite number (a stored setting is JSON, which has no inf or nan)"
    return None
