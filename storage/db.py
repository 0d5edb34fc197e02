"""Engines and migrations: SQLite (the default, in the state directory) or PostgreSQL, same code.

SQLite is tuned for one busy writer beside many readers: WAL, a busy timeout, foreign keys on,
``synchronous=NORMAL``. Python's sqlite3 driver (before 3.16) does its own, broken transaction
handling: no BEGIN before SELECT, DDL or SAVEPOINT, so a "transaction" may silently be several.
We switch it off and emit BEGIN ourselves, as SQLAlchemy's SQLite dialect documentation shows
("Transactions with SQLite and the sqlite3 driver"). Writers ask for ``BEGIN IMMEDIATE`` (see
``BEGIN_MODE``) so that they queue on the busy timeout up front instead of failing with
SQLITE_BUSY when a read transaction later tries to upgrade to a write.

A database that cannot take a write (locked past the busy timeout, full, read-only) raises one of the
``policies.errors.DatabaseUnavailableError`` types, whose one-line message names the database: the
API answers them 503/507 and the CLI prints them, instead of a 500 and a traceback.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.engine import ExceptionContext

from selftune.policies.config import StorageConfig
from selftune.policies.errors import (DatabaseBusyError, DatabaseFullError, DatabaseReadOnlyError,
                                      DatabaseUnavailableError)

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


def make_engine(url: str, busy_timeout_ms: int = StorageConfig.busy_timeout_ms,
                statement_timeout_ms: int = StorageConfig.statement_timeout_ms) -> Engine:
    """An engine for ``url`` (``sqlite:///PATH`` or ``postgresql+psycopg://...``), set up for selftune.

    ``busy_timeout_ms``: how long a writer waits for a lock (SQLite's busy timeout, PostgreSQL's
    lock_timeout); ``statement_timeout_ms``: PostgreSQL's statement_timeout (0: none).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed, json_serializer=_json_dumps)
        _configure_sqlite(engine, busy_timeout_ms)
    else:
        engine = create_engine(parsed, json_serializer=_json_dumps, pool_pre_ping=True)
        _configure_postgresql(engine, busy_timeout_ms, statement_timeout_ms)
    _raise_unavailable_as_selftune_errors(engine, busy_timeout_ms, statement_timeout_ms)
    return engine


def _configure_postgresql(engine: Engine, lock_timeout_ms: int, statement_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Session settings, so that a held lock or a runaway statement fails instead of waiting forever.
        # In autocommit: inside a transaction, the pool's rollback on checkin would undo them.
        # lock_timeout 0 would mean "wait forever"; busy_timeout_ms 0 means "do not wait", as on SQLite.
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        try:
            with dbapi_connection.cursor() as cursor:
                cursor.execute(f"SET lock_timeout = {max(1, int(lock_timeout_ms))}")
                cursor.execute(f"SET statement_timeout = {int(statement_timeout_ms)}")
        finally:
            dbapi_connection.autocommit = autocommit


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "do_connect")
    def _create_private(_dialect: Any, _record: Any, cargs: tuple[Any, ...], _cparams: Any) -> None:
        # SQLite creates a new database (and, like it, its -wal and -shm files) 0644 less the umask: every
        # local user could read each logged conversation. Create the file 0600 first, whatever the umask.
        path = Path(str(cargs[0])) if cargs else None
        if path is None or str(path) == ":memory:" or str(path).startswith("file:") or not path.parent.is_dir():
            return  # in memory, a URI, or nowhere to create it (SQLite says so itself)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return
        os.fchmod(fd, 0o600)
        os.close(fd)

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


SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_FULL = 5, 6, 8, 13
"""SQLite's primary result codes (the low byte of ``sqlite_errorcode``)."""
PG_LOCK_NOT_AVAILABLE, PG_QUERY_CANCELED, PG_DEADLOCK, PG_DISK_FULL = "55P03", "57014", "40P01", "53100"
"""PostgreSQL's SQLSTATEs for lock_timeout, statement_timeout, a deadlock and a full disk."""


def _raise_unavailable_as_selftune_errors(engine: Engine, busy_timeout_ms: int, statement_timeout_ms: int) -> None:
    @event.listens_for(engine, "handle_error")
    def _on_error(context: ExceptionContext) -> DatabaseUnavailableError | None:
        # SQLAlchemy raises what this returns, chained to the driver's error; None keeps its own error.
        return _unavailable(context, busy_timeout_ms, statement_timeout_ms)


def _unavailable(context: ExceptionContext, busy_timeout_ms: int, statement_timeout_ms: int
                 ) -> DatabaseUnavailableError | None:
    """The selftune error for a database that cannot take a write now, or None for any other error."""
    error, url = context.original_exception, context.engine.url if context.engine else None
    if url is None:
        return None
    if url.get_backend_name() == "sqlite":
        where = (url.database or ":memory:").removeprefix("file:")
        code = (getattr(error, "sqlite_errorcode", 0) or 0) & 0xFF
        connection = context.connection
        reading = connection is not None and connection.get_execution_options().get(BEGIN_MODE) == "READ"
        if code in (SQLITE_BUSY, SQLITE_LOCKED):
            return DatabaseBusyError(f"the database {where} is locked by another writer (waited "
                                     f"storage.busy_timeout_ms = {busy_timeout_ms} ms): retry shortly")
        if code == SQLITE_FULL:
            return DatabaseFullError(f"no room to write to the database {where}: SQLite reports the database or "
                                     f"disk full, and its disk has {_free_space(Path(where))} free: free some "
                                     "space there, then retry; nothing of the failed write was kept")
        if code == SQLITE_READONLY and not reading:  # in a READ transaction it is query_only: a caller's bug
            return DatabaseReadOnlyError(f"the database {where} is read-only to this process (user id {os.getuid()}): "
                                         "make it and its directory writable, or point storage.database_url "
                                         "at a writable one")
        return None
    where = url.set(query={}).render_as_string()  # the password masked
    state = getattr(error, "sqlstate", None)
    if state == PG_LOCK_NOT_AVAILABLE:
        return DatabaseBusyError(f"the database {where} is locked by another transaction (waited "
                                 f"storage.busy_timeout_ms = {busy_timeout_ms} ms): retry shortly")
    if state == PG_DEADLOCK:
        return DatabaseBusyError(f"a deadlock with another transaction on the database {where}: retry shortly")
    if state == PG_QUERY_CANCELED:
        return DatabaseBusyError(f"a statement on the database {where} was cancelled (storage.statement_timeout_ms "
                                 f"= {statement_timeout_ms} ms, or by the server): retry shortly")
    if state == PG_DISK_FULL:
        return DatabaseFullError(f"no room to write to the database {where}: the PostgreSQL server's disk is full; "
                                 "free some space there, then retry; nothing of the failed write was kept")
    return None


def _free_space(path: Path) -> str:
    """Free space on the file system of ``path`` (or of its nearest existing parent), e.g. "12.3 MiB"."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**20:,.1f} MiB"
    except OSError:
        return "an unknown amount of space"


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
