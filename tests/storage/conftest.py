"""The database backends every storage contract test runs on: SQLite (a temp file) and PostgreSQL.

PostgreSQL tests each get a fresh schema (dropped afterwards), so they are isolated and can run again
and again on the same server. If the server cannot be reached they fail, naming the URL: a contract
test that silently skips proves nothing.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import OperationalError

from selftune.storage import Store, make_engine, migrate, sqlite_url

PG_URL = os.environ.get("SELFTUNE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A URL whose connections use a new, empty schema of the test server (dropped at teardown)."""
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    schema = f"selftune_test_{uuid.uuid4().hex[:12]}"
    unreachable = None
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as error:
        unreachable = str(error.orig).strip()
    if unreachable is not None:  # failed outside the except block, so the report is just this message
        admin.dispose()
        shown = make_url(PG_URL).render_as_string(hide_password=True)
        pytest.fail(
            f"PostgreSQL at {shown} is unreachable ({unreachable}). Start it, point SELFTUNE_TEST_PG_URL at "
            "a server you can create schemas on, or deselect these tests with -m 'not postgres'.",
            pytrace=False,
        )
    try:
        yield make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database on each backend."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "selftune.db")
    return request.getfixturevalue("pg_schema_url")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()  # before the schema is dropped: open connections would block DROP SCHEMA


T0 = datetime(2025, 1, 1, tzinfo=UTC)


class TickingClock:
    """A clock that starts at ``T0`` and moves one second per reading: timestamps are exact and ordered."""

    def __init__(self) -> None:
        self._ticks = itertools.count()

    def __call__(self) -> datetime:
        return T0 + timedelta(seconds=next(self._ticks))


@pytest.fixture
def store(engine: Engine) -> Store:
    """A migrated, empty store on a ticking clock."""
    migrate(engine)
    return Store(engine, clock=TickingClock())
