"""Repositories: SQL in, frozen ``selftune.policies.records`` dataclasses out.

Use them through a unit of work, one database transaction::

    store = Store(make_engine(url))
    with store.transaction(write=True) as uow:  # commits on success, rolls back on any exception
        result = uow.interactions.add_batch(rows)

``selftune.storage.contracts`` says what a unit of work offers; callers annotate with it. Every
timestamp a repository writes comes from the store's ``clock`` (UTC, timezone-aware), never from
the database server, so tests can fix time and both backends store the same values. Everything is
SQLAlchemy Core on the tables of ``models``; the ingest path is one multi-row INSERT per batch.
One module per part of the schema: interactions (and feedback), lineage, cycles, replay, tokens.
"""

from __future__ import annotations

from .base import Clock, utc_now
from .store import SqlUnitOfWork, Store
from .tokens import TOKEN_PREFIX, hash_token

__all__ = ["TOKEN_PREFIX", "Clock", "SqlUnitOfWork", "Store", "hash_token", "utc_now"]
