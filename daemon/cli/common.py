"""What every command module shares: the consoles, the options, the state's Context, JSON output, the error exit.

Command modules import from here only (never from each other or from ``main``), so each one imports on
its own; ``main`` builds the app from them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy import make_url

from selftune.policies.errors import ConfigError
from selftune.policies.records import FOUNDATION_ID

from selftune.daemon.config import target_module_problems
from selftune.daemon.context import Context

PIPED_WIDTH = 100_000
"""Columns of a console whose output is not a terminal: rich would cut tables at 80, and a pipe has no width."""


def _console(stderr: bool = False) -> Console:
    """A rich console; piped or redirected (and COLUMNS unset), as wide as what it prints, so values print whole."""
    console = Console(stderr=stderr)
    return console if console.is_terminal or "COLUMNS" in os.environ else Console(stderr=stderr, width=PIPED_WIDTH)


console = _console()
err = _console(stderr=True)

StateOption = Annotated[str | None, typer.Option("--state", help="State directory \\[default: $SELFTUNE_STATE, "
                                                 "$STATE_DIRECTORY, ./.selftune]", show_default=False)]
ConfigOption = Annotated[str | None, typer.Option("--config", help="Configuration file \\[default: $SELFTUNE_CONFIG, "
                                                  "<state>/selftune.toml]", show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of text.")]


def remember_state(ctx: typer.Context, state: str | None, config: str | None) -> None:
    """The root callback's part: keep --state and --config for the command that runs."""
    ctx.obj = (state, config)


def open_context(ctx: typer.Context, create: bool = False) -> Context:
    """The state directory and configuration that --state and --config (or their defaults) name.

    Only ``init`` passes ``create``: any other command fails, naming the fix and creating nothing, on a
    directory without a state (a typo included) or a configuration file that was named but does not exist.
    """
    state, config = ctx.obj
    context = Context.open(state, config)
    if context.state.exists() and not context.state.is_dir():
        fail(f"the state directory {context.state} is a file: point --state (or $SELFTUNE_STATE) at a directory",
             code=2)
    if create:
        return context
    if (config or os.environ.get("SELFTUNE_CONFIG")) and not context.config_file.is_file():
        fail(f"no configuration file {context.config_file}: fix --config (or $SELFTUNE_CONFIG), or leave it out "
             f"to use {context.state / 'selftune.toml'}", code=2)
    if not has_state(context):
        fail(f"no selftune state in {context.state}: run selftune init (or fix --state / $SELFTUNE_STATE)", code=2)
    check_target_modules(context)
    return context


def has_state(context: Context) -> bool:
    """Whether ``init`` made a state here: its SQLite database exists (with another database, where the
    generations live)."""
    url = make_url(context.database_url)
    if url.get_backend_name() == "sqlite":
        return Path(url.database or "").is_file()
    return (context.state / "generations").is_dir()


def check_target_modules(context: Context) -> None:
    """``ConfigError`` if a ``train.target_modules`` names no layer of the foundation (generation 0), as the
    trainer would find only when a cycle starts."""
    foundation = context.state / "generations" / str(FOUNDATION_ID)
    if foundation.is_dir() and (problems := target_module_problems(context.config, foundation)):
        raise ConfigError(problems, source=f"configuration {context.config_file}")


def print_json(value: Any) -> None:
    """``value`` as strict JSON on standard output: a non-finite number (``selection.min_score = -inf``) is
    written as TOML writes it, the string "inf" or "-inf" (JSON has no infinity)."""
    print(json.dumps(_finite(value), indent=2, allow_nan=False))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command with one red ``error:`` line on standard error (the message printed as it is)."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)
