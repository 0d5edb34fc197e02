"""SQLite engine settings: every pooled connection gets them, and transactions really are transactions."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from selftune.policies.errors import DatabaseBusyError
from selftune.policies.records import InteractionIn, Message
from selftune.storage import Store, make_engine, migrate, sqlite_url


def test_every_sqlite_connection_is_configured(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "a.db"), busy_timeout_ms=1234)
    try:
        connections = [engine.connect() for _ in range(2)]  # two distinct pooled DBAPI connections
        for connection in connections:
            pragmas = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
            }
            assert pragmas == {"journal_mode": "wal", "busy_timeout": 1234, "foreign_keys": 1, "synchronous": 1}
        for connection in connections:
            connection.close()
    finally:
        engine.dispose()


def test_sqlite_url_is_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert sqlite_url("state/selftune.db") == f"sqlite:///{tmp_path.resolve()}/state/selftune.db"


def test_a_sqlite_read_transaction_sees_one_snapshot(tmp_path: Path) -> None:
    # The sqlite3 driver alone sends no BEGIN before a SELECT, so each read saw the latest data.
    engine = make_engine(sqlite_url(tmp_path / "b.db"))
    try:
        with engine.begin() as setup:
            setup.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        with engine.connect() as reader, reader.begin():
            before = reader.exec_driver_sql("SELECT count(*) FROM t").scalar()
            with engine.begin() as writer:
                writer.exec_driver_sql("INSERT INTO t VALUES (1)")
            assert reader.exec_driver_sql("SELECT count(*) FROM t").scalar() == before == 0
        with engine.connect() as fresh:
            assert fresh.exec_driver_sql("SELECT count(*) FROM t").scalar() == 1
    finally:
        engine.dispose()


def test_a_read_transaction_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    # Reads begin DEFERRED (with query_only), so they read the last commit while a writer holds the write lock;
    # if they began IMMEDIATE, as writers do, this read would wait out the busy timeout and fail "locked".
    engine = make_engine(sqlite_url(tmp_path / "c.db"), busy_timeout_ms=300)
    try:
        migrate(engine)
        store = Store(engine)
        row = InteractionIn((Message("user", "committed"), Message("assistant", "ok")))
        with store.transaction(write=True) as uow:
            uow.interactions.add_batch([row])
        with store.transaction(write=True) as writer:  # another connection: BEGIN IMMEDIATE, held open
            writer.interactions.add_batch([InteractionIn((Message("user", "uncommitted"),))])
            with pytest.raises(DatabaseBusyError, match="locked"):  # the write lock really is taken
                with store.transaction(write=True):
                    pass
            started = time.monotonic()
            with store.transaction() as reader:
                seen = [i.prompt for i in reader.interactions.list()]
            waited = time.monotonic() - started
        assert seen == ["committed"] and waited < 0.3
    finally:
        engine.dispose()


def test_ping_raises_when_the_database_cannot_be_opened(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "missing" / "selftune.db"))
    try:
        with pytest.raises(OperationalError, match="unable to open"):
            Store(engine).ping()
    finally:
        engine.dispose()


def test_the_writer_engine_takes_the_write_lock_as_it_begins(tmp_path: Path) -> None:
    # APScheduler's job store runs its own transactions on it: they must queue for the lock up front.
    engine = make_engine(sqlite_url(tmp_path / "d.db"), busy_timeout_ms=200)
    try:
        migrate(engine)
        store = Store(engine)
        with store.writer_engine().begin():  # nothing written yet
            with pytest.raises(DatabaseBusyError, match="locked"):
                with store.transaction(write=True):
                    pass
            with store.transaction() as reader:  # reads still go on
                assert reader.branches.list() == []
    finally:
        engine.dispose()
