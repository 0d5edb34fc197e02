from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from selftune.daemon.config import config_path, default_config_text, load_config, resolve_state_dir
from selftune.daemon.context import Context
from selftune.daemon.cycle.workdir import Work
from selftune.daemon.lineage import create_branch, set_branch_setting
from selftune.policies.branches import SPECIALIST_DEFAULTS
from selftune.policies.config import SECTIONS, Config
from selftune.policies.errors import ConfigError


def test_default_file_is_exactly_the_defaults_and_comments_every_setting(tmp_path: Path) -> None:
    path = tmp_path / "selftune.toml"
    path.write_text(default_config_text())
    assert load_config(path, env={}) == Config()
    lines = path.read_text().splitlines()
    for section, cls in SECTIONS.items():
        for name in cls.__dataclass_fields__:
            index = next(i for i, line in enumerate(lines) if line.startswith(f"{name} = "))
            start = index
            while lines[start - 1].startswith("# "):
                start -= 1
            comment = " ".join(lines[start:index])
            assert len(comment) > 20, f"{section}.{name} is not documented"


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "absent.toml", env={}) == Config()


def test_env_overrides_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = 9000\n[storage]\ndatabase_url = "sqlite:///x.db"\n')
    config = load_config(path, env={"SELFTUNE_SERVER__PORT": "9100", "SELFTUNE_MODEL__FOUNDATION": "/models/x"})
    assert (config.server.port, config.model.foundation, config.storage.database_url) == (9100, "/models/x", "sqlite:///x.db")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = 0\nhots = "x"\n[model]\nthreads = "many"\n[nope]\na = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"SELFTUNE_INGEST__DEFAULT_BRANCH": "Bad Name!"})
    text = str(info.value)
    assert len(info.value.problems) == 5, text
    for needle in ("server.hots: unknown setting", "model.threads = 'many': expected a whole number",
                   "unknown section [nope]", "server.port = 0", "ingest.default_branch = 'Bad Name!'"):
        assert needle in text


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path, env={})


def test_state_dir_precedence(tmp_path: Path) -> None:
    assert resolve_state_dir("a", {"SELFTUNE_STATE": "b", "STATE_DIRECTORY": "c"}) == Path("a").resolve()
    assert resolve_state_dir(None, {"SELFTUNE_STATE": "b", "STATE_DIRECTORY": "c"}) == Path("b").resolve()
    assert resolve_state_dir(None, {"STATE_DIRECTORY": "/var/lib/selftune:/other"}) == Path("/var/lib/selftune")
    assert resolve_state_dir(None, {}) == Path(".selftune").resolve()
    assert config_path(tmp_path, None, {}) == tmp_path / "selftune.toml"


def test_branch_tables_are_read_as_section_dot_key_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[branches.chem]\ntrain.steps = 30\n[branches.chem.gates]\nmax_params_ratio = 0.8\n'
                    '[branches.not-created-yet.pruning]\nenabled = true\n')
    config = load_config(path, env={})
    assert config.branches == {"chem": {"train.steps": 30, "gates.max_params_ratio": 0.8},
                               "not-created-yet": {"pruning.enabled": True}}
    assert (config.train.steps, config.gates.max_params_ratio) == (Config().train.steps, 1.0)  # global: untouched


def test_a_bad_branch_table_fails_at_load_naming_the_file_the_branch_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[branches.chem.gates]\nmax_param_ratio = 0.8\n[branches.chem.train]\nsteps = "many"\n'
                    '[branches.side.train]\nsteps = 0\n[branches.side.server]\nport = 1\n'
                    '[branches."Bad Name"]\nx = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = str(info.value)
    assert str(path) in text
    for needle in ("[branches.chem] no setting gates.max_param_ratio: did you mean gates.max_params_ratio?",
                   "[branches.chem] train.steps = 'many': expected a whole number",
                   "[branches.side] server.port is a service-wide setting",
                   "[branches.Bad Name]: not a branch name"):
        assert needle in text, text
    path.write_text('[branches.side.train]\nsteps = 0\n')  # a value only the section's own checks refuse
    with pytest.raises(ConfigError, match=r"\[branches.side\] train.steps = 0: use 1 or more"):
        load_config(path, env={})


def test_the_default_file_explains_branch_tables(tmp_path: Path) -> None:
    text = default_config_text()
    assert "# [branches.chem]" in text and "selftune branch set NAME KEY VALUE" in text


def test_a_cycle_runs_with_its_branchs_settings_fixed_when_it_first_reads_them(
        make_state: Callable[..., Path]) -> None:
    state = make_state('[train]\nsteps = 40\n[branches.chem.gates]\nmax_params_ratio = 0.8\n')
    context = Context.open(str(state))
    create_branch(context, "chem", 0, ["chemistry"])
    set_branch_setting(context, "chem", "train.steps", "7")
    with context.store.transaction(write=True) as tx:
        cycle = tx.cycles.create("chem", "select", parent_generation_id=0)
        parent = tx.generations.get(0)
    work = Work(context, cycle, parent)
    config = work.config
    assert (config.train.steps, config.gates.max_params_ratio, config.pruning.enabled) == (7, 0.8, True)
    assert work.config.train.batch_size == context.config.train.batch_size
    assert work.branch == {"name": "chem", "domains": ["chemistry"], "specialist": True,
                           "settings": {**SPECIALIST_DEFAULTS, "train.steps": 7, "gates.max_params_ratio": 0.8}}
    assert work.candidate_dir.name in ("pruned", "healed")  # a specialist prunes
    set_branch_setting(context, "chem", "train.steps", "9")  # while the cycle runs: from the next cycle on
    assert Work(context, cycle, parent).config.train.steps == 7  # a restarted worker keeps the cycle's settings
    with context.store.transaction(write=True) as tx:
        later = tx.cycles.create("chem", "select", parent_generation_id=0)
    assert Work(context, later, parent).config.train.steps == 9
    context.store.engine.dispose()
