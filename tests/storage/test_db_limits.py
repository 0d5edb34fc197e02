"""A database that cannot take a write (locked, full, read-only, a runaway statement) raises one of the
``DatabaseUnavailableError`` types, naming the database, and keeps nothing of the failed transaction;
a new SQLite database is private (0600) whatever the umask."""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import DBAPIError

from selftune.policies.errors import DatabaseBusyError, DatabaseFullError, DatabaseReadOnlyError
from selftune.policies.records import InteractionIn, Message
from selftune.storage import Store, make_engine, migrate, sqlite_url

ROW = InteractionIn((Message("user", "What is 2 + 2?"), Message("assistant", "4.")))


def big_rows(count: int) -> list[InteractionIn]:
    return [InteractionIn((Message("user", f"question {i} " + "x" * 4000), Message("assistant", "ok")))
            for i in range(count)]


def count_rows(store: Store) -> int:
    with store.transaction() as tx:
        return tx.connection.execute(text("SELECT count(*) FROM interactions")).scalar_one()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    engine = make_engine(sqlite_url(tmp_path / "selftune.db"), busy_timeout_ms=100)
    migrate(engine)
    yield Store(engine)
    engine.dispose()


def test_a_held_write_lock_is_a_busy_error_after_the_busy_timeout(sqlite_store: Store, tmp_path: Path) -> None:
    holder = sqlite3.connect(tmp_path / "selftune.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's writer, holding the lock
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseBusyError, match=r"selftune\.db is locked .*busy_timeout_ms = 100 ms"):
            with sqlite_store.transaction(write=True) as tx:
                tx.interactions.add_batch([ROW])
        assert 0.1 <= time.monotonic() - started < 2
        with pytest.raises(DatabaseBusyError):
            sqlite_store.check_writable()
        assert count_rows(sqlite_store) == 0  # reads go on
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    sqlite_store.check_writable()
    with sqlite_store.transaction(write=True) as tx:
        tx.interactions.add_batch([ROW])
    assert count_rows(sqlite_store) == 1


def test_a_full_database_is_a_full_error_naming_it_and_its_free_space_and_keeps_nothing(
        sqlite_store: Store, tmp_path: Path) -> None:
    with sqlite_store.transaction(write=True) as tx:
        tx.interactions.add_batch([ROW])
    # SQLite itself reports SQLITE_FULL ("database or disk is full") once the file would outgrow
    # max_page_count, as it does when the disk is full; 1 means "no bigger than now".
    event.listen(sqlite_store.engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA max_page_count = 1"))
    sqlite_store.engine.dispose()
    with pytest.raises(DatabaseFullError) as raised:
        with sqlite_store.transaction(write=True) as tx:
            tx.interactions.add_batch(big_rows(50))
    message = str(raised.value)
    assert str(tmp_path / "selftune.db") in message and "MiB free" in message and "\n" not in message
    assert count_rows(sqlite_store) == 1  # not one row of the 50: the transaction was rolled back whole


def test_a_read_only_database_is_a_read_only_error_but_a_read_transaction_writing_stays_a_bug(
        sqlite_store: Store, tmp_path: Path) -> None:
    with pytest.raises(DBAPIError, match="readonly"):  # query_only in a read transaction: the caller's mistake
        with sqlite_store.transaction() as tx:
            tx.interactions.add_batch([ROW])
    path = tmp_path / "selftune.db"
    # Opened read-only (as a file without write permission would be; the tests may run as root).
    read_only = Store(make_engine(f"sqlite:///file:{path}?mode=ro&uri=true"))
    try:
        assert count_rows(read_only) == 0
        with pytest.raises(DatabaseReadOnlyError, match=r"selftune\.db.* is read-only to this process"):
            with read_only.transaction(write=True) as tx:
                tx.interactions.add_batch([ROW])
    finally:
        read_only.engine.dispose()


def test_a_new_database_and_its_journal_files_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        engine = make_engine(sqlite_url(tmp_path / "selftune.db"))
        migrate(engine)
        with Store(engine).transaction(write=True) as tx:
            tx.interactions.add_batch([ROW])
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        engine.dispose()
    finally:
        os.umask(previous)
    assert modes == {"selftune.db": 0o600, "selftune.db-wal": 0o600, "selftune.db-shm": 0o600}


@pytest.mark.postgres
def test_postgresql_lock_and_statement_timeouts_come_from_the_settings(pg_schema_url: str) -> None:
    engine = make_engine(pg_schema_url, busy_timeout_ms=200, statement_timeout_ms=300)
    holder = create_engine(pg_schema_url)
    try:
        migrate(engine)
        store = Store(engine)
        with engine.connect() as connection:
            settings = [connection.exec_driver_sql(f"SHOW {name}").scalar() for name in ("lock_timeout",
                                                                                         "statement_timeout")]
        assert settings == ["200ms", "300ms"]
        with holder.connect() as other, other.begin():
            other.exec_driver_sql("LOCK TABLE interactions IN SHARE MODE")  # blocks inserts, not reads
            started = time.monotonic()
            with pytest.raises(DatabaseBusyError, match=r"is locked by another transaction .*= 200 ms"):
                with store.transaction(write=True) as tx:
                    tx.interactions.add_batch([ROW])
            assert time.monotonic() - started < 5  # not forever
            with pytest.raises(DatabaseBusyError):
                store.check_writable()
            assert count_rows(store) == 0
        store.check_writable()
        with pytest.raises(DatabaseBusyError, match=r"cancelled \(storage\.statement_timeout_ms = 300 ms"):
            with store.transaction() as tx:
                tx.connection.exec_driver_sql("SELECT pg_sleep(3)")
        with store.transaction(write=True) as tx:
            tx.interactions.add_batch([ROW])
        assert count_rows(store) == 1
    finally:
        holder.dispose()
        engine.dispose()
