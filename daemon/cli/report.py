"""CLI command ``selftune report GEN``: a generation's report in a terminal, as JSON, or in a web browser."""

from __future__ import annotations

import webbrowser
from typing import Annotated

import typer
from rich.markdown import Markdown

from selftune.daemon.cli.common import console, fail, open_context
from selftune.daemon.reports.files import REPORT_FILES, report_file

FormatOption = Annotated[str | None, typer.Option(
    "--format", help="md (read in the terminal), html (prints the path of the page) or json "
                     "\\[default: md; html with --open]", show_default=False)]


def report(ctx: typer.Context, generation: Annotated[int, typer.Argument(help="Generation id.")],
           fmt: FormatOption = None,
           open_: Annotated[bool, typer.Option("--open", help="Open the HTML report in a web browser.")] = False) -> None:
    """Show a generation's report: data, training curves, forgetting matrix, pruning, gates, sample answers."""
    fmt = (fmt or ("html" if open_ else "md")).lower()
    if fmt not in REPORT_FILES:
        fail(f"--format {fmt!r}: use one of {', '.join(REPORT_FILES)}")
    if open_ and fmt != "html":
        fail(f"--open shows the HTML report: drop --format {fmt} or use --format html")
    path = report_file(open_context(ctx), generation, fmt)
    if fmt == "html":
        print(path)
        if open_ and not webbrowser.open(path.as_uri()):
            fail(f"no web browser could be started here: open {path.as_uri()} yourself")
    elif fmt == "json":
        print(path.read_text(encoding="utf-8"), end="")
    elif console.is_terminal:
        console.print(Markdown(path.read_text(encoding="utf-8")))
    else:  # piped or redirected: the Markdown source itself, not a rendering of it
        print(path.read_text(encoding="utf-8"), end="")
