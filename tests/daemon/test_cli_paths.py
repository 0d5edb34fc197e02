"""Paths and values the CLI refuses in one line that names the fix, leaving everything as it was.

Most of these fail before anything heavy is imported, so each runs the real `selftune` command. Those that
need an initialised state share one, made in-process (``make_state``), and never change it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import SELFTUNE, free_port
from .test_cli import dump, selftune


@pytest.fixture(scope="module")
def state(make_state: Callable[..., Path]) -> Path:
    return make_state()


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.mark.parametrize(("args", "exists"), [(("status",), False), (("serve",), False), (("config",), True),
                                              (("token", "list"), True)],
                         ids=["status-missing", "serve-missing", "config-empty", "token-list-empty"])
def test_a_directory_without_a_state_is_refused_and_nothing_is_created(tmp_path: Path, args: tuple[str, ...],
                                                                       exists: bool) -> None:
    """Only init creates a state: a typo in --state, or an empty directory, is an error, not a new database."""
    missing = tmp_path / "stat"  # a typo of "state"
    if exists:
        missing.mkdir()
    result = selftune(missing, *args, ok=False)
    assert_one_line_error(result, f"no selftune state in {missing}: run selftune init")
    assert (list(missing.iterdir()) == []) if exists else not missing.exists()


@pytest.mark.parametrize("how", ["--config", "$SELFTUNE_CONFIG"])
def test_a_named_configuration_file_must_exist(state: Path, tmp_path: Path, how: str) -> None:
    missing = tmp_path / "selftune.tmol"
    args, env = (("--config", str(missing)), None) if how == "--config" else ((), {"SELFTUNE_CONFIG": str(missing)})
    result = selftune(state, *args, "status", env=env, ok=False)
    assert_one_line_error(result, f"no configuration file {missing}", "--config")
    assert not missing.exists()


@pytest.mark.parametrize("args", [("init",), ("status",)], ids=["init", "status"])
def test_a_file_given_as_the_state_directory_is_refused(tmp_path: Path, args: tuple[str, ...]) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("not a state")
    result = selftune(file, *args, ok=False)
    assert_one_line_error(result, f"the state directory {file} is a file", "--state")
    assert file.read_text() == "not a state"


def test_serve_refuses_a_port_out_of_range_before_starting(tmp_path: Path) -> None:
    result = selftune(tmp_path, "serve", "--port", "70000", ok=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "'--port'" in result.stderr and "65535" in result.stderr, result.stderr


def test_a_failed_init_leaves_nothing_behind(tmp_path: Path) -> None:
    """It had written selftune.toml, selftune.db and generations/ before the foundation failed to load. What
    was there stays (a new state directory goes whole)."""
    state = tmp_path / "state"
    state.mkdir()  # as systemd's StateDirectory= makes it, here with a file of the operator's
    (state / "notes.txt").write_text("mine")
    result = selftune(state, "init", "--foundation", str(tmp_path / "no-such-model"), ok=False)
    assert_one_line_error(result, "no-such-model", "is not a directory")
    assert [p.name for p in state.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(("setting", "problem"), [
    ({"SELFTUNE_SCHEDULE__CRON": "61 * * * *"}, "schedule.cron = '61 * * * *': Error validating expression '61'"),
    ({"SELFTUNE_TRAIN__TARGET_MODULES": '["q_prj", "v_proj"]'}, "has no module q_prj; its linear layers: "),
    ("[branches.chem.train]\ntarget_modules = [\"q_prj\"]\n", "[branches.chem] train.target_modules = ['q_prj']"),
], ids=["cron", "target-modules", "branch-table-target-modules"])
def test_config_refuses_what_the_service_would(state: Path, tmp_path: Path, setting: dict[str, str] | str,
                                                problem: str) -> None:
    """The crontab as APScheduler reads it, the target modules as the foundation's layers (from its
    safetensors header): wrong, they fail every command now, not the scheduler or the first cycle later."""
    args: tuple[str, ...] = ()
    if isinstance(setting, str):
        (tmp_path / "selftune.toml").write_text(setting)
        args = ("--config", str(tmp_path / "selftune.toml"))
    result = selftune(state, *args, "config", env=setting if isinstance(setting, dict) else None, ok=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert problem in result.stderr and "invalid configuration" in result.stderr, result.stderr


# -- a full disk and a read-only database: real ones, in a private mount namespace (no root needed) -------------

def in_private_mounts(script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``script`` run by sh in new user and mount namespaces: mounts it makes vanish when it exits."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unprivileged user and mount namespaces (util-linux unshare -rm)")
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=timeout)


def test_a_full_disk_ends_in_one_line_naming_the_database_and_the_free_space(state: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"full disk {i} " + "x" * 500, "response": "y" * 500}) + "\n"
                            for i in range(2000)))  # 2 MB: more than the disk has room for
    size_kib = (state / "selftune.db").stat().st_size // 1024 + 96
    disk_, state_, q = str(disk), str(state), shlex.quote
    result = in_private_mounts(
        f"mount -t tmpfs -o size={size_kib}k tmpfs {q(disk_)} && cp {q(state_)}/selftune.db {q(state_)}/selftune.toml "
        f"{q(disk_)}/ && exec {q(SELFTUNE)} --state {q(disk_)} ingest {q(str(rows))}")
    assert_one_line_error(result, f"the database {disk / 'selftune.db'}", "MiB free")


@pytest.mark.parametrize(("read_only", "problem"), [
    ("selftune.db", "the database {state}/selftune.db is read-only"),
    (".", "Read-only file system: '{state}/"),  # the cycle lock, before the database
], ids=["database", "state-directory"])
def test_a_read_only_database_at_serve_start_is_a_clear_error(state: Path, read_only: str, problem: str) -> None:
    before = dump(state)
    path, q = str(state / read_only), shlex.quote
    result = in_private_mounts(f"mount --bind {q(path)} {q(path)} && mount -o remount,ro,bind {q(path)} {q(path)} && "
                               f"exec {q(SELFTUNE)} --state {q(str(state))} serve --port {free_port()}")
    assert_one_line_error(result, problem.format(state=state))
    assert dump(state) == before
