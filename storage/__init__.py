"""selftune.storage: the database (SQLAlchemy 2 + Alembic) behind selftune. Never imports torch."""

from __future__ import annotations

from .contracts import UnitOfWork
from .db import current_revision, head_revision, make_engine, migrate, sqlite_url
from .repositories import Store

__all__ = ["Store", "UnitOfWork", "current_revision", "head_revision", "make_engine", "migrate", "sqlite_url"]
