"""CLI commands over the state directory: init, status, generations, export, config."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.tree import Tree
from sqlalchemy import make_url

from selftune.daemon.cli.common import JsonOption, check_target_modules, console, open_context, print_json
from selftune.daemon.config import default_config_text
from selftune.daemon.context import Context
from selftune.daemon.lineage import ensure_generation_zero
from selftune.daemon.service.models import Models
from selftune.daemon.views import generation_detail, generations_view, status_view


def init(ctx: typer.Context, foundation: Annotated[str | None, typer.Option(
        help='Generation 0: "embedded" (SmolLM2-135M-Instruct) or a local transformers model directory '
             "\\[default: model.foundation from the configuration]")] = None, as_json: JsonOption = False) -> None:
    """Create the state directory and database, and materialise the foundation as generation 0."""
    context = open_context(ctx, create=True)
    with _removed_on_failure(context):
        written = context.write_default_config()
        with console.status("materialising generation 0 (the foundation model)..."):
            generation, created = ensure_generation_zero(context, foundation or context.config.model.foundation)
        check_target_modules(context)  # train.target_modules must name layers of this foundation
    if as_json:
        print_json({"created": created, "state": str(context.state), "config_file": str(context.config_file),
                    "wrote_config": written, "generation": generation_detail(context, generation.id)})
        return
    if written:
        console.print(f"wrote the default configuration to {context.config_file}", highlight=False)
    verb = "created" if created else "already initialised:"
    console.print(f"{verb} generation {generation.id} of branch {generation.branch} "
                  f"({generation.params:,} parameters) at {generation.path}; state in {context.state}", highlight=False)


@contextmanager
def _removed_on_failure(context: Context) -> Iterator[None]:
    """A failed (or interrupted) init leaves nothing behind: what it created goes, what was there stays."""
    url = make_url(context.database_url)
    database = Path(url.database) if url.get_backend_name() == "sqlite" and url.database else None
    made = [path for path in (context.state, context.config_file, database, context.state / "generations")
            if path is not None and not path.exists()]
    try:
        yield
    except BaseException:
        if "store" in context.__dict__:  # opened: let go of the database file before removing it
            context.store.engine.dispose()
        for path in made:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            for created in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
                if created.is_file():
                    created.unlink()
        raise


def status(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Interactions per branch and domain, generations, and aliases."""
    view = status_view(open_context(ctx))
    if as_json:
        print_json(view)
        return
    table = Table(title="Interactions")
    for column in ("branch", "domain", "interactions"):
        table.add_column(column, justify="right" if column == "interactions" else "left")
    for row in view["interactions"]:
        table.add_row(row["branch"], row["domain"] or "-", f"{row['count']:,}")
    console.print(table)
    _print_generations(view["generations"])


def generations(ctx: typer.Context, as_json: JsonOption = False,
                tree: Annotated[bool, typer.Option("--tree", help="Show the lineage as a tree.")] = False) -> None:
    """Every generation: id, parent, branch, status, parameters, path and aliases."""
    rows = generations_view(open_context(ctx))
    if as_json:
        print_json(rows)
    elif tree:
        console.print(_lineage_tree(rows))
    else:
        _print_generations(rows)


def export(ctx: typer.Context,
           name: Annotated[str, typer.Argument(
               metavar="NAME", help="A generation id, or a model name as the API takes it: BRANCH (its champion), "
                                    "BRANCH@champion, BRANCH@challenger or BRANCH@ID.")],
           directory: Annotated[Path, typer.Argument(help="New or empty directory to write the model to.")],
           as_json: JsonOption = False) -> None:
    """Write a generation as a transformers model directory, with its generation.json beside the weights."""
    context = open_context(ctx)
    models = Models(context)
    target = models.generation(int(name)) if name.isascii() and name.isdigit() else models.pin(name)
    out = context.artifacts.export(target.generation_id, directory)
    if as_json:
        print_json({"generation": target.generation_id, "branch": target.branch, "name": name, "directory": str(out)})
        return
    named = "" if name == str(target.generation_id) else f" ({name})"
    console.print(f"exported generation {target.generation_id}{named} of branch {target.branch} to {out}",
                  highlight=False)


def show_config(ctx: typer.Context,
                default: Annotated[bool, typer.Option("--default", help="Print the commented default file.")] = False) -> None:
    """Print the configuration in force (after environment overrides) as JSON, or the commented default.

    JSON has no infinity: a non-finite number is printed as the TOML file writes it, "inf" or "-inf"."""
    if default:
        print(default_config_text(), end="")
        return
    context = open_context(ctx)
    print_json({"state": str(context.state), "config_file": str(context.config_file), **asdict(context.config)})


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
