"""What the CLI prints: help text whole, --json on every command that makes or changes something, whole
values when piped, strict JSON, and the ingest bar's two passes (issue 16 point 6)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import typer
from typer.testing import CliRunner

from selftune.daemon.cli.main import app
from selftune.daemon.context import Context
from selftune.policies.records import CHAMPION

from .conftest import SELFTUNE
from .test_cli import selftune


@pytest.fixture(scope="module")
def state(make_state: Callable[..., Path]) -> Path:
    """A state whose ``main`` has a generation 1 (a copy of 0's files) under the champion 0, to roll back to."""
    state = make_state()
    context = Context.open(str(state))
    with context.store.transaction(write=True) as tx:
        zero = tx.generations.get(0)
        tx.generations.add("main", zero.path, zero.checksum, zero.params, parent_id=0, status="promoted", id=1)
    context.store.engine.dispose()
    return state


def commands(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from commands(sub, (*path, name))


def flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def test_help_shows_every_option_text_whole() -> None:
    """Rich reads [...] as markup: unescaped, "[default: ingest.default_branch]" vanished from the help."""
    runner = CliRunner()
    for path, command in commands(typer.main.get_command(app)):
        shown = flat(runner.invoke(app, [*path, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"}).output)
        for param in command.params:
            if getattr(param, "help", None):
                assert flat(param.help.replace("\\[", "[")) in shown, (path, param.name, shown)


def set_champion(state: Path, generation: int) -> None:
    context = Context.open(str(state))
    with context.store.transaction(write=True) as tx:
        tx.aliases.set("main", CHAMPION, generation)
    context.store.engine.dispose()


@pytest.mark.parametrize(("args", "expected"), [
    (("init", "--foundation", "{model}"), {"created": False, "generation": {"id": 0, "branch": "main"}}),
    (("export", "main@0", "{tmp}/out"), {"generation": 0, "branch": "main", "name": "main@0", "directory": "{tmp}/out"}),
    (("promote", "0"), {"id": 0, "status": "promoted", "aliases": ["champion"]}),
    (("rollback", "main"), {"id": 0, "parent": None, "aliases": ["champion"]}),
    (("token", "create", "--scope", "ingest", "--name", "ci"), {"name": "ci", "scope": "ingest", "revoked_at": None}),
    (("branch", "create", "side", "--from", "0"), {"name": "side", "root": 0, "champion": 0, "specialist": False}),
], ids=["init", "export", "promote", "rollback", "token-create", "branch-create"])
def test_json_on_every_command_that_makes_or_changes_something(state: Path, tiny_model_dir: Path, tmp_path: Path,
                                                               args: tuple[str, ...], expected: dict[str, Any]) -> None:
    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: fill(item) for key, item in value.items()}
        return value.format(model=tiny_model_dir, tmp=tmp_path) if isinstance(value, str) else value

    set_champion(state, 1)  # rollback moves it back to 0; the others do not mind
    printed = json.loads(selftune(state, *map(fill, args), "--json").stdout)
    assert_contains(printed, fill(expected))
    if args[0] == "token":
        assert printed["token"] and printed["id"] > 0
    if args[0] == "export":
        assert json.loads((tmp_path / "out" / "generation.json").read_text())["id"] == 0


def assert_contains(printed: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_contains(printed[key], value)
        else:
            assert printed[key] == value, (key, printed)


def test_piped_tables_print_whole_values(state: Path) -> None:
    """Rich cut a pipe at 80 columns: a path or a name was wrapped inside its cell, or cut short."""
    name = "a-token-with-a-long-name-" + "x" * 80
    selftune(state, "token", "create", "--scope", "ingest", "--name", name)
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    shown = subprocess.run([SELFTUNE, "--state", str(state), "token", "list"], capture_output=True, text=True,
                           env=env, check=True).stdout
    assert name in shown, shown
    shown = subprocess.run([SELFTUNE, "--state", str(state), "generations"], capture_output=True, text=True,
                           env=env, check=True).stdout
    assert str(state / "generations" / "0") in shown, shown


def test_config_prints_strict_json(state: Path) -> None:
    """json.dumps wrote -Infinity for selection.min_score: not JSON (jq and most parsers refuse it)."""
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    printed = json.loads(selftune(state, "config").stdout, parse_constant=refuse)
    assert printed["selection"]["min_score"] == "-inf"


def test_ingest_shows_a_checking_and_a_writing_bar_each_the_size_of_the_file(state: Path, tmp_path: Path) -> None:
    """Both passes advanced one bar whose total was twice the file's size."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"bar {i} " + "x" * 200, "response": "y"}) + "\n"
                            for i in range(1000)))
    size = re.escape(f"{rows.stat().st_size / 1000:.1f}")  # rich's DownloadColumn: "241.9/241.9 kB"
    terminal, bar_side = os.openpty()  # standard error is a terminal: the bar is drawn
    process = subprocess.Popen([SELFTUNE, "--state", str(state), "ingest", str(rows)], stdout=subprocess.PIPE,
                               stderr=bar_side, env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})
    os.close(bar_side)
    drawn = b""
    while chunk := _read(terminal):
        drawn += chunk
    os.close(terminal)
    assert process.wait(60) == 0 and b"1000 accepted" in process.stdout.read()  # type: ignore[union-attr]
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn.decode(errors="replace"))
    for phase in ("checking", "writing"):
        assert re.search(rf"{phase}\s+\S+\s+{size}/{size} kB", text), text[-600:]


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # the process closed its end
        return b""
