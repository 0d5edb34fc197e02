"""The store and its units of work: one database transaction, with every repository on its connection."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, func, select

from ..contracts import UnitOfWork
from ..db import BEGIN_MODE
from ..models import InteractionRow
from .base import Clock, utc_now
from .cycles import SqlCycleRepository
from .interactions import _INGEST_LOCK_KEY, SqlFeedbackRepository, SqlInteractionRepository
from .lineage import SqlAliasRepository, SqlBranchRepository, SqlGenerationRepository
from .replay import SqlReplayRepository
from .tokens import SqlTokenRepository


class Store:
    """The database behind selftune: hands out units of work (transactions) over one engine."""

    def __init__(self, engine: Engine, clock: Clock = utc_now) -> None:
        self.engine = engine
        self.clock = clock

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[UnitOfWork]:
        """One transaction: committed when the block ends, rolled back if it raises. Read-only unless ``write``.

        A read takes no write lock, so it never waits for (or blocks) a writer; the database refuses
        any write inside it (SQLite ``query_only``, PostgreSQL ``READ ONLY``), so a caller that forgot
        ``write=True`` fails loudly instead of taking the lock by accident. On SQLite a writing
        transaction starts with ``BEGIN IMMEDIATE``: it waits (busy timeout) for the write lock up
        front, so it cannot fail half way with "database is locked" when another writer got there
        between its reads and its writes.
        """
        with self.engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                connection.execution_options(**{BEGIN_MODE: "IMMEDIATE" if write else "READ"})
            with connection.begin():
                if connection.dialect.name == "postgresql":
                    connection.exec_driver_sql(f"SET TRANSACTION {'READ WRITE' if write else 'READ ONLY'}")
                yield SqlUnitOfWork(connection, self.clock)

    def check_writable(self) -> None:
        """Raise ``DatabaseBusyError`` (or another ``DatabaseUnavailableError``) now, before work whose result
        would be lost if it could not be stored: take and release the lock that logging an interaction
        takes (SQLite's write lock; on PostgreSQL the ingest lock and the interactions table's), waiting at
        most the busy timeout."""
        with self.transaction(write=True) as tx:
            if tx.connection.dialect.name == "postgresql":
                tx.connection.execute(select(func.pg_advisory_xact_lock(_INGEST_LOCK_KEY)))
                tx.connection.exec_driver_sql(f"LOCK TABLE {InteractionRow.__tablename__} IN ROW EXCLUSIVE MODE")

    def ping(self) -> None:
        """Raise if the database cannot be reached (the readiness check): one ``SELECT 1``, which locks nothing."""
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1").scalar_one()

    def writer_engine(self) -> Engine:
        """The engine for a library that runs its own transactions and writes in them (APScheduler's job
        store): on SQLite each of them begins IMMEDIATE, so it queues for the write lock up front."""
        return self.engine.execution_options(**{BEGIN_MODE: "IMMEDIATE"})


class SqlUnitOfWork:
    """The repositories, all on one connection inside one transaction (``contracts.UnitOfWork``)."""

    def __init__(self, connection: Connection, clock: Clock) -> None:
        self.connection = connection
        self.interactions = SqlInteractionRepository(connection, clock)
        self.feedback = SqlFeedbackRepository(connection, clock)
        self.branches = SqlBranchRepository(connection, clock)
        self.generations = SqlGenerationRepository(connection, clock)
        self.aliases = SqlAliasRepository(connection, clock)
        self.cycles = SqlCycleRepository(connection, clock)
        self.replay = SqlReplayRepository(connection, clock)
        self.tokens = SqlTokenRepository(connection, clock)
