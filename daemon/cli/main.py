"""The ``selftune`` command line. Heavy imports (torch, transformers) happen inside the commands that need them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table
from rich.tree import Tree

from selftune.policies.errors import SelftuneError
from selftune.policies.ingest import FORMATS, RowDefaults

from selftune.daemon import ingest as ingest_mod
from selftune.daemon.config import default_config_text
from selftune.daemon.context import Context

app = typer.Typer(help="selftune: a continual self-tuning daemon for small language models.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True)

StateOption = Annotated[str | None, typer.Option("--state", help="State directory [default: $SELFTUNE_STATE, "
                                                 "$STATE_DIRECTORY, ./.selftune]", show_default=False)]
ConfigOption = Annotated[str | None, typer.Option("--config", help="Configuration file [default: $SELFTUNE_CONFIG, "
                                                  "<state>/selftune.toml]", show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.callback()
def main(ctx: typer.Context, state: StateOption = None, config: ConfigOption = None) -> None:
    ctx.obj = (state, config)


def _context(ctx: typer.Context) -> Context:
    state, config = ctx.obj
    return Context.open(state, config)


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


@app.command()
def init(ctx: typer.Context, foundation: Annotated[str | None, typer.Option(
        help='Generation 0: "embedded" (SmolLM2-135M-Instruct) or a local transformers model directory '
             "[default: model.foundation from the configuration]")] = None) -> None:
    """Create the state directory and database, and materialise the foundation as generation 0."""
    from selftune.daemon.foundation import ensure_generation_zero

    context = _context(ctx)
    written = context.write_default_config()
    if written:
        console.print(f"wrote the default configuration to {context.config_file}")
    with console.status("materialising generation 0 (the foundation model)..."):
        generation, created = ensure_generation_zero(context, foundation or context.config.model.foundation)
    verb = "created" if created else "already initialised:"
    console.print(f"{verb} generation {generation.id} of branch {generation.branch} "
                  f"({generation.params:,} parameters) at {generation.path}; state in {context.state}")


@app.command()
def ingest(ctx: typer.Context,
           file: Annotated[str, typer.Argument(help="A JSONL file, or - for standard input.")],
           branch: Annotated[str | None, typer.Option(help="Branch the rows go to [default: ingest.default_branch].")] = None,
           domain: Annotated[str | None, typer.Option(help="Domain for rows that do not name one.")] = None,
           fmt: Annotated[str, typer.Option("--format", help=f"Row format: {', '.join(FORMATS)}.")] = "auto",
           skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Ingest the good rows and report the bad ones, "
                                                      "instead of rejecting the whole file.")] = False,
           as_json: JsonOption = False) -> None:
    """Ingest interaction logs: OpenAI chat, ShareGPT or prompt/response JSONL. Idempotent."""
    if fmt not in FORMATS:
        _fail(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    from selftune.daemon.lineage import domain_routes

    context = _context(ctx)
    defaults = RowDefaults(branch=branch or context.config.ingest.default_branch, domain=domain,
                           source=f"ingest:{Path(file).name if file != '-' else 'stdin'}",
                           max_message_chars=context.config.ingest.max_message_chars,
                           routes={} if branch else domain_routes(context))
    store = context.store
    context.require_branch(defaults.branch)

    def add_batch(rows: list) -> Any:
        with store.transaction(write=True) as tx:
            return tx.interactions.add_batch(rows)

    with ingest_mod.open_input(file) as (stream, size):
        passes = 1 if skip_invalid else 2
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True,
                      disable=as_json or not err.is_terminal) as bar:
            task = bar.add_task("ingesting", total=size * passes)
            report = ingest_mod.ingest(stream, add_batch, fmt=fmt, defaults=defaults,
                                       batch_rows=context.config.storage.batch_rows, skip_invalid=skip_invalid,
                                       progress=lambda n: bar.advance(task, n))
    for error in report.errors:
        err.print(f"skipped {error}", highlight=False, markup=False)
    counts = {"accepted": report.result.accepted, "duplicates": report.result.duplicates,
              "rejected": report.result.rejected}
    if as_json:
        print(json.dumps(counts))
    else:
        console.print(f"{counts['accepted']} accepted, {counts['duplicates']} duplicates, "
                      f"{counts['rejected']} rejected (branch {defaults.branch})")


@app.command()
def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Interactions per branch and domain, generations, and aliases."""
    from selftune.daemon.views import status_view

    view = status_view(_context(ctx))
    if as_json:
        print(json.dumps(view, indent=2))
        return
    table = Table(title="Interactions")
    for column in ("branch", "domain", "interactions"):
        table.add_column(column, justify="right" if column == "interactions" else "left")
    for row in view["interactions"]:
        table.add_row(row["branch"], row["domain"] or "-", f"{row['count']:,}")
    console.print(table)
    _print_generations(view["generations"])


@app.command()
def generations(ctx: typer.Context, as_json: JsonOption = False,
                tree: Annotated[bool, typer.Option("--tree", help="Show the lineage as a tree.")] = False) -> None:
    """Every generation: id, parent, branch, status, parameters, path and aliases."""
    from selftune.daemon.views import generations_view

    rows = generations_view(_context(ctx))
    if as_json:
        print(json.dumps(rows, indent=2))
    elif tree:
        console.print(_lineage_tree(rows))
    else:
        _print_generations(rows)


@app.command()
def export(ctx: typer.Context, generation: Annotated[int, typer.Argument(help="Generation id.")],
           directory: Annotated[Path, typer.Argument(help="New or empty directory to write the model to.")]) -> None:
    """Write a generation as a transformers model directory, with its generation.json beside the weights."""
    context = _context(ctx)
    with context.store.transaction() as tx:
        tx.generations.get(generation)  # an unknown id fails here, naming it
    out = context.artifacts.export(generation, directory)
    console.print(f"exported generation {generation} to {out}")


@app.command("config")
def show_config(ctx: typer.Context,
                default: Annotated[bool, typer.Option("--default", help="Print the commented default file.")] = False) -> None:
    """Print the configuration in force (after environment overrides), or the commented default."""
    if default:
        print(default_config_text(), end="")
        return
    from dataclasses import asdict

    context = _context(ctx)
    print(json.dumps({"state": str(context.state), "config_file": str(context.config_file),
                      **asdict(context.config)}, indent=2))


def _print_generations(rows: list[dict[str, Any]]) -> None:
    table = Table(title="Generations")
    for column in ("id", "parent", "branch", "status", "params", "aliases", "path"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["id"]), "-" if row["parent"] is None else str(row["parent"]), row["branch"],
                      row["status"], f"{row['params']:,}", ", ".join(row["aliases"]) or "-", row["path"])
    console.print(table)


def _lineage_tree(rows: list[dict[str, Any]]) -> Tree:
    colours = {"promoted": "green", "rejected": "red", "failed": "red", "candidate": "yellow"}
    children: dict[int | None, list[dict[str, Any]]] = {}
    for row in rows:
        children.setdefault(row["parent"], []).append(row)
    root = Tree("[bold]lineage[/]")

    def add(node: Tree, parent: int | None) -> None:
        for row in children.get(parent, []):
            aliases = f" [bold cyan]<{', '.join(row['aliases'])}>[/]" if row["aliases"] else ""
            label = (f"[bold]{row['id']}[/] {row['branch']} [{colours.get(row['status'], 'white')}]{row['status']}[/]"
                     f" {row['params'] / 1e6:.1f}M params{aliases}")
            add(node.add(label), row["id"])

    add(root, None)
    return root


def run() -> None:
    """Entry point: selftune's own errors end in one clear line, not a traceback."""
    try:
        app()
    except SelftuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


# Commands of the other areas, registered here to keep this file small (they import from it, so last).
from selftune.daemon.cli.lineage import branch_app, cycle, promote, rollback  # noqa: E402
from selftune.daemon.cli.report import report  # noqa: E402
from selftune.daemon.cli.serve import serve, token_app  # noqa: E402

for command in (cycle, promote, rollback, report, serve):
    app.command()(command)
app.add_typer(branch_app, name="branch")
app.add_typer(token_app, name="token")
