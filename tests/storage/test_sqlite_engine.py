"""SQLite engine settings: every pooled connection gets them, and transactions really are transactions."""

from __future__ import annotations

from pathlib import Path

from selftune.storage import make_engine, sqlite_url


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
