"""Where the state lives, and the configuration: TOML file, then ``SELFTUNE_<SECTION>__<KEY>`` overrides.

Every problem (unknown section or key, wrong type, bad value) is collected and reported at once.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import os
import textwrap
import tomllib
from collections.abc import Mapping
from dataclasses import fields, replace
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selftune.policies.branches import BRANCH_SECTIONS, effective_config, settings_problems
from selftune.policies.config import BRANCH_NAME, SECTIONS, Config, field_types, value_problem
from selftune.policies.errors import ConfigError

if TYPE_CHECKING:
    from apscheduler.triggers.cron import CronTrigger

CONFIG_FILE = "selftune.toml"
BRANCHES_TABLE = "branches"
"""``[branches.NAME]``: one branch's own settings (see ``policies.branches``)."""
ENV_PREFIX = "SELFTUNE_"


def resolve_state_dir(option: str | None = None, env: Mapping[str, str] = os.environ) -> Path:
    """``--state``, else ``$SELFTUNE_STATE``, else systemd's ``$STATE_DIRECTORY``, else ``./.selftune``."""
    chosen = option or env.get("SELFTUNE_STATE") or env.get("STATE_DIRECTORY", "").split(":")[0] or ".selftune"
    return Path(chosen).expanduser().resolve()


def config_path(state: Path, option: str | None = None, env: Mapping[str, str] = os.environ) -> Path:
    """``--config``, else ``$SELFTUNE_CONFIG``, else ``<state>/selftune.toml``."""
    return Path(option or env.get("SELFTUNE_CONFIG") or state / CONFIG_FILE).expanduser().resolve()


def load_config(path: Path | None, env: Mapping[str, str] = os.environ) -> Config:
    """The file's settings (defaults where it is silent or absent), then environment overrides."""
    problems: list[str] = []
    raw: dict[str, Any] = {}
    if path is not None and path.exists():
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{path}: not valid TOML ({exc}); compare it with `selftune config --default`"]) from exc
    merged = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for section, key, value in _env_overrides(env, problems):
        merged.setdefault(section, {})[key] = value
    tables = _branch_tables(merged.pop(BRANCHES_TABLE, {}), problems)
    sections = {name: _build_section(name, merged.pop(name, {}), problems) for name in SECTIONS}
    problems += [f"unknown section [{name}]: known sections are {', '.join(SECTIONS)}, and [{BRANCHES_TABLE}.NAME]"
                 for name in merged]
    problems += [p for section in sections.values() for p in section.problems()]
    if not problems:
        problems += _branch_table_problems(Config(**sections), tables) + _cron_problems(sections["schedule"].cron)
    if problems:
        raise ConfigError(problems, source=f"configuration {path}" if path else "configuration")
    return Config(**sections, branches=tables)


def _branch_tables(raw: Any, problems: list[str]) -> dict[str, dict[str, Any]]:
    """``[branches.NAME]`` tables as ``{NAME: {"section.key": value}}``. A table may use sub-tables
    (``[branches.NAME.gates]``) or dotted keys (``gates.max_params_ratio = 0.8``); TOML makes both the same."""
    if not isinstance(raw, dict):
        problems.append(f"[{BRANCHES_TABLE}] must hold one table per branch, e.g. [{BRANCHES_TABLE}.chem]")
        return {}
    tables: dict[str, dict[str, Any]] = {}
    for name, table in raw.items():
        if not BRANCH_NAME.match(name):
            problems.append(f"[{BRANCHES_TABLE}.{name}]: not a branch name (lowercase letters, digits, '-' and '_')")
        elif not isinstance(table, dict):
            problems.append(f"{BRANCHES_TABLE}.{name} must be a table of settings, "
                            f"e.g. [{BRANCHES_TABLE}.{name}.gates]")
        else:
            flat: dict[str, Any] = {}
            for section, values in table.items():
                if isinstance(values, dict):
                    flat.update({f"{section}.{key}": value for key, value in values.items()})
                else:
                    flat[section] = values  # a key without its section: settings_problems names it
            tables[name] = flat
            problems += [f"[{BRANCHES_TABLE}.{name}] {p}" for p in settings_problems(flat)]
    return tables


def _branch_table_problems(config: Config, tables: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What each table's values break together with the rest, for a generalist and for a specialist
    (whether the branch will have a scope is not known here; it may not even exist yet)."""
    problems: list[str] = []
    for name in tables:
        for domains in ((), ("any",)):
            try:
                effective_config(replace(config, branches=tables), name, domains)
            except ConfigError as exc:
                problems += [f"[{BRANCHES_TABLE}.{name}] {p}" for p in exc.problems if p not in problems]
                break
    return problems


def cron_trigger(expression: str) -> CronTrigger:
    """``schedule.cron`` as the UTC trigger the scheduler runs; a ``ConfigError`` naming the setting if APScheduler
    refuses it (so loading the configuration refuses what the service would)."""
    from apscheduler.triggers.cron import CronTrigger  # only when a crontab is set

    try:
        return CronTrigger.from_crontab(expression, timezone=UTC)
    except ValueError as exc:
        raise ConfigError([f"schedule.cron = {expression!r}: {exc}; e.g. \"0 3 * * *\" is every day at 03:00 UTC"]) \
            from None


def _cron_problems(expression: str) -> list[str]:
    if expression:
        try:
            cron_trigger(expression)
        except ConfigError as exc:
            return exc.problems
    return []


def target_module_problems(config: Config, model_dir: Path) -> list[str]:
    """Each ``train.target_modules`` (global, and of each ``[branches.NAME]`` table) that names no module of the
    model in ``model_dir``: the trainer's check, made from the tensor names of its safetensors headers (no
    weights are read)."""
    from safetensors import safe_open  # only for a state with a model

    names: set[str] = set()
    for path in sorted(model_dir.glob("model*.safetensors")):
        with safe_open(path, framework="numpy") as weights:
            names.update(part for key in weights.keys() for part in key.split(".")[:-1])  # noqa: SIM118
    if not names:
        return []
    listed = {"train.target_modules": config.train.target_modules} | {
        f"[{BRANCHES_TABLE}.{name}] train.target_modules": table["train.target_modules"]
        for name, table in config.branches.items() if "train.target_modules" in table}
    layers = sorted(n for n in names if n.endswith("proj"))
    return [f"{setting} = {list(modules)!r}: the foundation ({model_dir}) has no module {', '.join(missing)}; "
            f"its linear layers: {', '.join(layers)}"
            for setting, modules in listed.items() if (missing := [m for m in modules if m not in names])]


def _env_overrides(env: Mapping[str, str], problems: list[str]) -> list[tuple[str, str, Any]]:
    out = []
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        field_type = field_types(section).get(key)
        if field_type is None:
            problems.append(f"${name}: no setting {section}.{key}; use SELFTUNE_<SECTION>__<KEY>, e.g. SELFTUNE_SERVER__PORT")
            continue
        if field_type is str:
            out.append((section, key, text))
            continue
        try:
            out.append((section, key, tomllib.loads(f"v = {text}")["v"]))
        except tomllib.TOMLDecodeError:
            problems.append(f"${name} = {text!r}: not a TOML value (numbers as 3 or 0.5, booleans as true/false, lists as [\"a\"])")
    return out


def _build_section(name: str, values: Any, problems: list[str]) -> Any:
    cls = SECTIONS[name]
    if not isinstance(values, dict):
        problems.append(f"[{name}] must be a table of settings, got {values!r:.40}")
        return cls()
    types = field_types(name)
    kwargs = {}
    for key, value in values.items():
        if key not in types:
            problems.append(f"{name}.{key}: unknown setting; known: {', '.join(types)}")
        elif (problem := value_problem(value, types[key])) is not None:
            problems.append(f"{name}.{key} = {value!r:.60}: {problem}")
        else:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def default_config_text() -> str:
    """The default configuration as ``selftune init`` writes it: every setting, commented with its docstring.

    Rendered from the dataclasses themselves, so the file and the code cannot drift apart.
    """
    parts = [HEADER]
    for name, cls in SECTIONS.items():
        docs = _field_docs(cls)
        parts.append(f"\n[{name}]")
        for f in fields(cls):
            parts += [f"# {line}".rstrip() for line in textwrap.wrap(" ".join(docs.get(f.name, "").split()), 96)]
            parts.append(f"{f.name} = {_toml_value(getattr(cls(), f.name))}")
    parts.append(BRANCHES_EXAMPLE)
    return "\n".join(parts) + "\n"


HEADER = """\
# selftune configuration. Every setting is shown at its default; change what you need.
# Any setting can be overridden from the environment: SELFTUNE_<SECTION>__<KEY>, e.g. SELFTUNE_SERVER__PORT=9000."""


BRANCHES_EXAMPLE = "\n" + "\n".join(f"# {line}" for line in textwrap.wrap(
    f"A branch's own settings: a [{BRANCHES_TABLE}.NAME] table sets any key of the sections "
    f"{', '.join(BRANCH_SECTIONS)} (but cycle.nice) for that branch. It overrides the sections above and "
    "a specialist's defaults; `selftune branch set NAME KEY VALUE` stores a setting with the branch, which "
    "wins over its table. `selftune branch list` shows each branch's settings and where they come from.", 96)
) + f"\n# [{BRANCHES_TABLE}.chem]\n# gates.max_params_ratio = 0.8\n# train.steps = 200"


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its documentation, by our convention)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = after.value.value
    return docs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)
