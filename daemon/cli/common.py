"""What every command module shares: the consoles, the options, the state's Context, and the error exit.

Command modules import from here only (never from each other or from ``main``), so each one imports on
its own; ``main`` builds the app from them.
"""

from __future__ import annotations

from typing import Annotated, NoReturn

import typer
from rich.console import Console

from selftune.daemon.context import Context

console = Console()
err = Console(stderr=True)

StateOption = Annotated[str | None, typer.Option("--state", help="State directory \\[default: $SELFTUNE_STATE, "
                                                 "$STATE_DIRECTORY, ./.selftune]", show_default=False)]
ConfigOption = Annotated[str | None, typer.Option("--config", help="Configuration file \\[default: $SELFTUNE_CONFIG, "
                                                  "<state>/selftune.toml]", show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def remember_state(ctx: typer.Context, state: str | None, config: str | None) -> None:
    """The root callback's part: keep --state and --config for the command that runs."""
    ctx.obj = (state, config)


def open_context(ctx: typer.Context) -> Context:
    """The state directory and configuration that --state and --config (or their defaults) name."""
    state, config = ctx.obj
    return Context.open(state, config)


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command with one red ``error:`` line on standard error."""
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)
