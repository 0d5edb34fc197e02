"""CLI commands of the lineage: cycle, promote, rollback, branch."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from selftune.daemon.cli.common import JsonOption, console, fail, open_context, print_json
from selftune.daemon.context import Context
from selftune.daemon.cycle.control import resume_cycles, running_cycle, start_cycle
from selftune.daemon.lineage import create_branch, set_branch_setting
from selftune.daemon.lineage import promote as promote_generation
from selftune.daemon.lineage import rollback as rollback_branch
from selftune.daemon.views import branches_view, cycle_view, generation_detail

branch_app = typer.Typer(help="Branches: specialised lines of generations.", no_args_is_help=True)
FINAL = ("promoted", "candidate", "rejected", "skipped", "failed", "cancelled")


def cycle(ctx: typer.Context,
          branch: Annotated[str | None, typer.Option(help="Branch to run the cycle on "
                                                           "\\[default: ingest.default_branch].")] = None,
          wait: Annotated[bool, typer.Option("--wait", help="Wait for the cycle to finish, showing its progress.")] = False,
          as_json: JsonOption = False) -> None:
    """Run one cycle on a branch: train on its new interactions and gate a new generation."""
    context = open_context(ctx)
    branch = branch or context.config.ingest.default_branch  # as the API's POST /v1/cycles
    unfinished = running_cycle(context)
    if unfinished is not None and unfinished.branch == branch:
        resume_cycles(context)  # a cycle interrupted by a crash goes on where it stopped
        cycle_id = unfinished.id
    else:
        cycle_id = start_cycle(context, branch, trigger="cli").id
    if not wait:
        view = cycle_view(context, cycle_id)
        print_json(view) if as_json else console.print(f"cycle {cycle_id} started on branch {branch}")
        return
    view = _wait(context, cycle_id, show=not as_json)
    if as_json:
        print_json({"cycle": view["cycle"], "generation": view["generation"], "status": view["status"],
                    "gates": view["gates"], "error": view["error"]})
    else:
        _print_cycle(view)
    if view["status"] in ("failed", "cancelled"):
        raise typer.Exit(1)


def _wait(context: Context, cycle_id: int, show: bool) -> dict[str, Any]:
    with Live(console=console, transient=True, auto_refresh=False, redirect_stderr=False) as live:
        while (view := cycle_view(context, cycle_id))["status"] not in FINAL:
            if show:
                live.update(_progress_line(view), refresh=True)
            time.sleep(1.0)
    return view


def _progress_line(view: dict[str, Any]) -> str:
    line = f"cycle {view['cycle']} on {view['branch']}: step [bold]{view['state']}[/]"
    progress = view.get("progress") or {}
    if view["state"] == "train" and progress:
        line += (f"  step {progress.get('step')}/{progress.get('total_steps')}  loss {progress.get('loss', 0):.3f}"
                 f"  ewc {progress.get('ewc_penalty', 0):.3g}  {progress.get('tokens_per_s', 0):.0f} tok/s")
    return line


def _print_cycle(view: dict[str, Any]) -> None:
    console.print(f"cycle {view['cycle']}: [bold]{view['status']}[/]"
                  + (f", generation {view['generation']}" if view["generation"] is not None else "")
                  + (f" ({view['error']})" if view["error"] else ""))
    if view["gates"]:
        table = Table(title="Gates")
        for column in ("gate", "passed", "value", "threshold", "margin"):
            table.add_column(column)
        for g in view["gates"]:
            table.add_row(g["name"], "[green]yes[/]" if g["passed"] else "[red]no[/]", _num(g.get("value")),
                          _num(g.get("threshold")), _num(g.get("margin")))
        console.print(table)


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def promote(ctx: typer.Context, generation: Annotated[int, typer.Argument(help="Generation id.")],
            as_json: JsonOption = False) -> None:
    """Make a generation the champion of its branch (e.g. a candidate awaiting approval)."""
    context = open_context(ctx)
    promoted = promote_generation(context, generation)
    if as_json:
        print_json(generation_detail(context, promoted.id))  # what POST /v1/generations/ID/promote answers
    else:
        console.print(f"generation {promoted.id} is now the champion of branch {promoted.branch}")


def rollback(ctx: typer.Context, branch: Annotated[str, typer.Argument(help="Branch name.")],
             as_json: JsonOption = False) -> None:
    """Move a branch's champion back to the champion's parent."""
    context = open_context(ctx)
    champion = rollback_branch(context, branch)
    if as_json:
        print_json(generation_detail(context, champion.id))
    else:
        console.print(f"branch {branch}: champion is generation {champion.id} again")


@branch_app.command("create")
def branch_create(ctx: typer.Context, name: Annotated[str, typer.Argument(help="New branch name.")],
                  from_generation: Annotated[int, typer.Option("--from", help="Generation to fork from.")],
                  domain: Annotated[list[str] | None, typer.Option(
                      help="Route interactions of this domain to the branch (repeat for several); a branch with "
                           "domains is a specialist.")] = None,
                  as_json: JsonOption = False) -> None:
    """Fork a line at a generation; its cycles use the interactions routed to it. With --domain, a specialist."""
    context = open_context(ctx)
    branch = create_branch(context, name, from_generation, domain or [])
    if as_json:
        print_json(next(row for row in branches_view(context) if row["name"] == branch.name))
        return
    routed = (f"; a specialist: interactions of domain(s) {', '.join(branch.domains)} now go to it"
              if branch.domains else "")
    console.print(f"branch {branch.name} forked from generation {from_generation}{routed}")


@branch_app.command("set")
def branch_set(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Branch name.")],
               key: Annotated[str, typer.Argument(help="SECTION.KEY, e.g. gates.max_params_ratio.")],
               value: Annotated[str | None, typer.Argument(help="The value: true/false, a number, a string, or a "
                                                               "list as a,b (put -- before a negative number).",
                                                          show_default=False)] = None,
               unset: Annotated[bool, typer.Option("--unset", help="Drop the stored setting instead.")] = False,
               ) -> None:
    """Store a setting with a branch; it wins over the configuration file. A bad key or value changes nothing."""
    if (value is None) != unset:
        fail("give a VALUE, or --unset to drop the stored setting (not both)")
    branch = set_branch_setting(open_context(ctx), name, key, value)
    done = f"{key} = {json.dumps(branch.settings[key])}" if value is not None else f"{key} unset"
    console.print(f"branch {branch.name}: {done}", highlight=False)


@branch_app.command("unset")
def branch_unset(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Branch name.")],
                 key: Annotated[str, typer.Argument(help="SECTION.KEY of a stored setting.")]) -> None:
    """Drop a setting stored with a branch: the configuration file (or the default) applies again."""
    branch = set_branch_setting(open_context(ctx), name, key, None)
    console.print(f"branch {branch.name}: {key} unset", highlight=False)


@branch_app.command("list")
def branch_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Every branch: its root, scope, champion, whether it is a specialist, and its settings that differ from
    the global configuration (with where each comes from)."""
    rows = branches_view(open_context(ctx))
    if as_json:
        print_json(rows)
        return
    table = Table(title="Branches")
    for column in ("name", "root", "domains", "specialist", "champion"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], str(row["root"]), ", ".join(row["domains"]) or "-",
                      "yes" if row["specialist"] else "no", str(row["champion"]))
    console.print(table, highlight=False)
    for row in rows:  # one line per setting, below the table: long keys and values would wrap inside it
        if row["settings"]:
            console.print(f"\n[bold]{row['name']}[/]: settings that differ from the global configuration",
                          highlight=False)
        for setting in row["settings"]:
            console.print(f"  {setting['key']} = {json.dumps(setting['value'])} ({setting['source']}; "
                          f"global {json.dumps(setting['global'])})", highlight=False, soft_wrap=True)
