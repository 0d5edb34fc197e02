"""Streaming ingest of JSONL interaction logs: check the whole input, then write it in batches.

Two passes over the file keep memory constant and make a malformed file rejected whole without
holding a write lock for its whole length: the first pass only parses, the second writes batched
transactions (idempotent, so a crash half-way is mended by ingesting the same file again).
Standard input is spooled to a temporary file first so it can be read twice.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import orjson

from selftune.policies.errors import IngestRejectedError, InvalidRecordError
from selftune.policies.ingest import RowDefaults, parse_row
from selftune.policies.records import IngestResult, InteractionIn

MAX_ERRORS_SHOWN = 20
Progress = Callable[[int], None]
"""Called with the number of bytes read since the last call."""


@dataclass
class IngestReport:
    result: IngestResult = field(default_factory=IngestResult)
    errors: list[InvalidRecordError] = field(default_factory=list)
    """The first malformed rows (at most MAX_ERRORS_SHOWN); ``result.rejected`` counts them all."""


def iter_rows(stream: BinaryIO, fmt: str, defaults: RowDefaults,
              progress: Progress | None = None) -> Iterator[InteractionIn | InvalidRecordError]:
    """Each non-blank line as a validated interaction, or the error that names its line."""
    for line_no, raw in enumerate(stream, start=1):
        if progress:
            progress(len(raw))
        if not raw.strip():
            continue
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            yield InvalidRecordError(f"not valid JSON: {exc}", line_no)
            continue
        try:
            yield parse_row(value, fmt, defaults)
        except InvalidRecordError as exc:
            yield InvalidRecordError(exc.reason, line_no)


def check(stream: BinaryIO, fmt: str, defaults: RowDefaults, progress: Progress | None = None) -> IngestReport:
    """Parse everything, write nothing: the errors a write would be rejected for."""
    report = IngestReport()
    for row in iter_rows(stream, fmt, defaults, progress):
        if isinstance(row, InvalidRecordError):
            _note_error(report, row)
    return report


def write(stream: BinaryIO, add_batch: Callable[[list[InteractionIn]], IngestResult], fmt: str,
          defaults: RowDefaults, batch_rows: int, progress: Progress | None = None) -> IngestReport:
    """Write the good rows in batches of ``batch_rows`` (one transaction each); count the bad ones."""
    report = IngestReport()
    batch: list[InteractionIn] = []
    for row in iter_rows(stream, fmt, defaults, progress):
        if isinstance(row, InvalidRecordError):
            _note_error(report, row)
            continue
        batch.append(row)
        if len(batch) >= batch_rows:
            report.result += add_batch(batch)
            batch = []
    if batch:
        report.result += add_batch(batch)
    return report


def ingest(source: BinaryIO, add_batch: Callable[[list[InteractionIn]], IngestResult], *, fmt: str = "auto",
           defaults: RowDefaults = RowDefaults(), batch_rows: int = 5000, skip_invalid: bool = False,
           progress: Progress | None = None) -> IngestReport:
    """Ingest a seekable JSONL stream. Without ``skip_invalid`` a malformed row rejects it whole."""
    if not skip_invalid:
        checked = check(source, fmt, defaults, progress)
        if checked.result.rejected:
            raise IngestRejectedError(checked.errors, checked.result.rejected)
        source.seek(0)
    return write(source, add_batch, fmt, defaults, batch_rows, progress)


@contextmanager
def open_input(name: str) -> Iterator[tuple[BinaryIO, int]]:
    """A seekable binary stream and its size for a path, or for "-" a spooled copy of standard input."""
    if name != "-":
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {name} (give a JSONL file, or - for standard input)")
        with path.open("rb") as stream:
            yield stream, path.stat().st_size
        return
    with tempfile.TemporaryFile() as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
        size = spool.tell()
        spool.seek(0)
        yield spool, size


def _note_error(report: IngestReport, error: InvalidRecordError) -> None:
    report.result += IngestResult(rejected=1)
    if len(report.errors) < MAX_ERRORS_SHOWN:
        report.errors.append(error)
