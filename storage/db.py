"""Engines and migrations: SQLite (the default, in the state directory) or PostgreSQL, same code.

SQLite is tuned for one busy writer beside many readers: WAL, a busy timeout, foreign keys on,
``synchronous=NORMAL``. Python's sqlite3 driver (before 3.16) does its own, broken transaction
handling: no BEGIN before SELECT, DDL or SAVEPOINT, so a "transaction" may silently be several.
We switch it off and emit BEGIN ourselves, as SQLAlchemy's SQLite dialect documentation shows
("Transactions with SQLite and the sqlite3 driver"). Writers ask for ``BEGIN IMMEDIATE`` (see
``BEGIN_MODE``) so that they queue on the busy timeout up front instead of failing with
SQLITE_BUSY when a read transaction later tries to upgrade to a write.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import URL, Engine, create_engine, event, make_url

if TYPE_CHECKING:
    from alembic.config import Config

BEGIN_MODE = "selftune_sqlite_begin"
"""Execution option naming how a SQLite transaction begins: "DEFERRED" (default), "IMMEDIATE" (a writer,
which takes the write lock up front) or "READ" (deferred, with writes refused by ``query_only``)."""
SQLITE_BEGIN_MODES = ("DEFERRED", "IMMEDIATE", "EXCLUSIVE", "READ")
SQLITE_CACHE_KIB = 32 * 1024
"""Page cache per SQLite connection (default 2 MiB). The dedupe index takes random inserts; when its
pages stay cached, a 200k-row ingest writes much less (measured 20k -> 27-30k rows/s)."""
SQLITE_WAL_AUTOCHECKPOINT_PAGES = 10_000
"""Checkpoint the WAL every ~40 MB instead of every 4 MB: fewer fsyncs and rewrites during bulk ingest."""
SCRIPT_LOCATION = "selftune.storage:migrations"
"""Alembic's package-resource form: found through the import system, so no CWD and no ini file is needed."""


def sqlite_url(path: str | Path) -> str:
    """The SQLAlchemy URL of a SQLite database file (made absolute, so a later chdir changes nothing)."""
    return URL.create("sqlite", database=str(Path(path).expanduser().resolve())).render_as_string()


def _json_dumps(value: Any) -> str:
    """Compact UTF-8 JSON; orjson because encoding messages was a third of the ingest time."""
    return orjson.dumps(value).decode()


def make_engine(url: str, busy_timeout_ms: int = 30000) -> Engine:
    """An engine for ``url`` (``sqlite:///PATH`` or ``postgresql+psycopg://...``), set up for selftune."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, json_serializer=_json_dumps)
        _configure_sqlite(engine, busy_timeout_ms)
        return engine
    return create_engine(parsed, json_serializer=_json_dumps, pool_pre_ping=True)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Stop sqlite3 from emitting BEGIN/COMMIT on its own; _on_begin emits BEGIN instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
            cursor.execute(f"PRAGMA wal_autocheckpoint = {SQLITE_WAL_AUTOCHECKPOINT_PAGES}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(BEGIN_MODE, "DEFERRED")
        if mode not in SQLITE_BEGIN_MODES:
            raise ValueError(f"{BEGIN_MODE}={mode!r}: use one of {', '.join(SQLITE_BEGIN_MODES)}")
        # query_only is per connection, and pooled connections are reused: set it on every BEGIN.
        connection.exec_driver_sql(f"PRAGMA query_only = {int(mode == 'READ')}")
        connection.exec_driver_sql("BEGIN DEFERRED" if mode == "READ" else f"BEGIN {mode}")


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic config built in code; with ``engine`` its URL is set (the CLI's env.py path uses it)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if engine is not None:
        # '%' is ConfigParser's interpolation character.
        config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def migrate(engine: Engine) -> str:
    """Upgrade the database to the newest schema (a no-op when it is there already); returns that revision.

    Runs in one transaction (``BEGIN IMMEDIATE`` on SQLite), so two processes that start together
    migrate one after the other, and a failed migration leaves nothing half done.
    """
    head = head_revision()
    if current_revision(engine) == head:  # the common case, without Alembic's upgrade machinery
        return head
    from alembic import command

    config = alembic_config(engine)
    with engine.connect().execution_options(**{BEGIN_MODE: "IMMEDIATE"}) as connection:
        with connection.begin():
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    revision = current_revision(engine)
    assert revision is not None, "alembic upgrade finished without a revision"
    return revision


def head_revision() -> str:
    """The newest revision that this package's migrations define."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, f"no migrations found at {SCRIPT_LOCATION}"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None if it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
