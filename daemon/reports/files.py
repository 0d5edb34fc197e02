"""Where a generation's reports live: one lookup for the CLI, the HTTP API and the report writer."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from selftune.policies.errors import InvalidRecordError, NotFoundError

from selftune.daemon.context import Context


class ReportFile(NamedTuple):
    name: str
    """The file's name inside the generation's directory."""
    media_type: str


REPORT_FILES = {"html": ReportFile("report.html", "text/html; charset=utf-8"),
                "md": ReportFile("report.md", "text/markdown; charset=utf-8"),
                "json": ReportFile("report.json", "application/json")}
"""The report formats, by name."""


def report_file(context: Context, generation_id: int, fmt: str) -> Path:
    """The path of a generation's report in format ``fmt`` (html, md or json), after checking it exists."""
    if fmt not in REPORT_FILES:
        raise InvalidRecordError(f"report format {fmt!r}: use one of {', '.join(REPORT_FILES)}")
    with context.store.transaction() as tx:
        tx.generations.get(generation_id)  # an unknown id fails here, naming it
    path = context.artifacts.path(generation_id) / REPORT_FILES[fmt].name
    if not path.is_file():
        raise NotFoundError(f"generation {generation_id} has no {path.name}: reports are written with each trained "
                            "generation; generation 0 (the foundation) has none")
    return path
