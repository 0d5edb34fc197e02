from __future__ import annotations

from pathlib import Path

import pytest

from selftune.daemon.config import config_path, default_config_text, load_config, resolve_state_dir
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
