"""What every repository shares: the connection of its unit of work, the store's clock, small helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.expression import TableClause

Clock = Callable[[], datetime]
IN_CHUNK = 500
"""Ids per ``IN (...)`` list: far below every backend's bound-parameter limit."""


def utc_now() -> datetime:
    return datetime.now(UTC)


class Repository:
    """One table's (or a few tables') SQL, on the connection of a unit of work."""

    def __init__(self, connection: Connection, clock: Clock) -> None:
        self.connection = connection
        self.clock = clock

    def _insert(self, into: TableClause) -> Any:
        """The dialect's INSERT, which knows ON CONFLICT (SQLite >= 3.35 and PostgreSQL)."""
        dialect = self.connection.dialect.name
        if dialect == "sqlite":
            return sqlite.insert(into)
        if dialect == "postgresql":
            return postgresql.insert(into)
        raise NotImplementedError(f"database {dialect!r} is not supported: use SQLite or PostgreSQL")

    def _exists(self, column: Any, value: object) -> bool:
        return self.connection.execute(select(column).where(column == value).limit(1)).first() is not None


def chunks(values: Sequence[Any], size: int = IN_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
