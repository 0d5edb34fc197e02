"""CLI command ``selftune ingest FILE``: interaction logs from a file or standard input, with a progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from selftune.policies.ingest import FORMATS, RowDefaults

from selftune.daemon.cli.common import JsonOption, console, err, fail, open_context
from selftune.daemon.ingest import ingest as ingest_stream
from selftune.daemon.ingest import open_input
from selftune.daemon.lineage import domain_routes


def ingest(ctx: typer.Context,
           file: Annotated[str, typer.Argument(help="A JSONL file, or - for standard input.")],
           branch: Annotated[str | None, typer.Option(help="Branch the rows go to \\[default: ingest.default_branch].")] = None,
           domain: Annotated[str | None, typer.Option(help="Domain for rows that do not name one.")] = None,
           fmt: Annotated[str, typer.Option("--format", help=f"Row format: {', '.join(FORMATS)}.")] = "auto",
           skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Ingest the good rows and report the bad ones, "
                                                      "instead of rejecting the whole file.")] = False,
           as_json: JsonOption = False) -> None:
    """Ingest interaction logs: OpenAI chat, ShareGPT or prompt/response JSONL. Idempotent."""
    if fmt not in FORMATS:
        fail(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    context = open_context(ctx)
    defaults = RowDefaults(branch=branch or context.config.ingest.default_branch, domain=domain,
                           source=f"ingest:{Path(file).name if file != '-' else 'stdin'}",
                           max_message_chars=context.config.ingest.max_message_chars,
                           routes={} if branch else domain_routes(context))
    store = context.store
    context.require_branch(defaults.branch)

    def add_batch(rows: list) -> Any:
        with store.transaction(write=True) as tx:
            return tx.interactions.add_batch(rows)

    with open_input(file) as (stream, size):
        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True,
                      disable=as_json or not err.is_terminal) as bar:
            # One bar per pass over the file: without --skip-invalid it is checked whole before it is written.
            if not skip_invalid:
                bar.add_task("checking", total=size)
            last = bar.add_task("writing", total=size)

            def advance(n: int) -> None:  # a pass reads the whole file: the first unfinished bar is this pass's
                bar.advance(next((task.id for task in bar.tasks if not task.finished), last), n)

            report = ingest_stream(stream, add_batch, fmt=fmt, defaults=defaults,
                                   batch_rows=context.config.storage.batch_rows, skip_invalid=skip_invalid,
                                   progress=advance)
    for error in report.errors:
        err.print(f"skipped {error}", highlight=False, markup=False)
    counts = {"accepted": report.result.accepted, "duplicates": report.result.duplicates,
              "rejected": report.result.rejected}
    notes = {"feedback": (report.result.feedback, "new feedback on stored rows"),
             "conflicts": (report.result.conflicts, "conflicts")}
    counts |= {key: n for key, (n, _) in notes.items() if n}  # only when there are some: the usual shape stays
    if report.result.conflicts:
        err.print(f"{report.result.conflicts} row(s) reuse a stored id with other messages and were not written "
                  f"(the stored rows stay; give an edited row a new id): {', '.join(report.result.conflict_ids)}",
                  highlight=False, markup=False)
    if as_json:
        print(json.dumps(counts))
    else:
        console.print(f"{counts['accepted']} accepted, {counts['duplicates']} duplicates, "
                      f"{counts['rejected']} rejected (branch {defaults.branch})"
                      + "".join(f", {n} {label}" for n, label in notes.values() if n))
