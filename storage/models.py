"""The tables, as SQLAlchemy 2 declarative models. Repositories use their ``__table__`` with Core.

The migrations in ``migrations/versions`` create exactly this schema (a test compares them).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    # Named constraints, so that later migrations can drop or alter them (SQLite batch mode needs names).
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JsonDoc = JSON().with_variant(JSONB(), "postgresql")
"""JSON everywhere; JSONB on PostgreSQL (indexable, compact)."""

# 64-bit ids on PostgreSQL; INTEGER on SQLite, where only "INTEGER PRIMARY KEY" is the fast rowid alias.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that goes in and comes out as a timezone-aware UTC datetime on every backend.

    SQLite has no time zones: it stores naive UTC text, and the zone is attached again on the way out.
    PostgreSQL stores ``timestamptz`` and answers in the session's zone, which we convert to UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()}: pass a timezone-aware one (datetime.now(UTC))")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class InteractionRow(Base):
    """One logged exchange. ``dedupe_key`` (external id, else content hash) makes re-ingest a no-op."""

    __tablename__ = "interactions"
    __table_args__ = (
        UniqueConstraint("branch", "dedupe_key"),
        # "New since id" scans per branch; also serves every lookup by branch alone.
        Index("ix_interactions_branch_id", "branch", "id"),
        # AUTOINCREMENT: ids are never reused, so an "after id" cutoff stays valid after deletes.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    external_id: Mapped[str | None] = mapped_column(Text)
    branch: Mapped[str] = mapped_column(Text)
    domain: Mapped[str | None] = mapped_column(Text, index=True)
    tags: Mapped[list[str]] = mapped_column(JsonDoc)
    messages: Mapped[list[dict[str, str]]] = mapped_column(JsonDoc)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    source: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str] = mapped_column(String(64))
    dedupe_key: Mapped[str] = mapped_column(Text)
    # Input fields selftune does not interpret (records.InteractionIn.metadata). The attribute cannot be
    # called "metadata" (Declarative's own); in Core the column is ``c["metadata"]``.
    extra_fields: Mapped[dict[str, Any]] = mapped_column("metadata", JsonDoc)


class FeedbackRow(Base):
    """Feedback on an interaction; deleted with it."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    interaction_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("interactions.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(Text)
    thumbs_up: Mapped[bool | None] = mapped_column(Boolean)
    score: Mapped[float | None] = mapped_column(Float)
    corrected_response: Mapped[str | None] = mapped_column(Text)
    chosen: Mapped[str | None] = mapped_column(Text)
    rejected: Mapped[str | None] = mapped_column(Text)
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class BranchRow(Base):
    """A line of generations; a fork's root is the generation it was forked from."""

    __tablename__ = "branches"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # use_alter: branches and generations refer to each other; this FK is added after both exist.
    root_generation_id: Mapped[int | None] = mapped_column(
        Integer, ForeignKey("generations.id", use_alter=True)
    )
    # "section.key" -> value (policies.branches): what `selftune branch set` stored.
    settings: Mapped[dict[str, Any]] = mapped_column(JsonDoc, server_default=text("'{}'"))


class BranchDomainRow(Base):
    """One domain of a branch's scope: its interactions are routed to that branch.

    The domain is the primary key, so a domain belongs to at most one branch on every backend, even
    when two branches are created at the same time."""

    __tablename__ = "branch_domains"

    domain: Mapped[str] = mapped_column(Text, primary_key=True)
    branch: Mapped[str] = mapped_column(Text, ForeignKey("branches.name"), index=True)


class GenerationRow(Base):
    """One model in the lineage tree. Ids are given, not generated: the foundation is generation 0."""

    __tablename__ = "generations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("generations.id"), index=True)
    branch: Mapped[str] = mapped_column(Text, ForeignKey("branches.name"), index=True)
    status: Mapped[str] = mapped_column(Text)
    path: Mapped[str] = mapped_column(Text)
    checksum: Mapped[str] = mapped_column(Text)
    params: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    # No FK: a cycle points at its generation, and the generation only remembers which cycle made it.
    cycle_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


class AliasRow(Base):
    """A movable name per branch (champion, challenger) pointing at one generation."""

    __tablename__ = "aliases"

    branch: Mapped[str] = mapped_column(Text, ForeignKey("branches.name"), primary_key=True)
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    generation_id: Mapped[int] = mapped_column(Integer, ForeignKey("generations.id"), index=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class CycleRow(Base):
    """One run of the cycle state machine on a branch."""

    __tablename__ = "cycles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    branch: Mapped[str] = mapped_column(Text, ForeignKey("branches.name"), index=True)
    state: Mapped[str] = mapped_column(Text)
    parent_generation_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("generations.id"))
    generation_id: Mapped[int | None] = mapped_column(Integer, ForeignKey("generations.id"))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    outcome: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)


class CycleEventRow(Base):
    """One step of a cycle: its timing, outcome and details."""

    __tablename__ = "cycle_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cycle_id: Mapped[int] = mapped_column(Integer, ForeignKey("cycles.id", ondelete="CASCADE"), index=True)
    step: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    detail: Mapped[dict[str, Any]] = mapped_column(JsonDoc)


class ReplayMemberRow(Base):
    """An interaction kept in a branch's replay buffer, with the experience (cycle) it came from."""

    __tablename__ = "replay_members"

    branch: Mapped[str] = mapped_column(Text, primary_key=True)
    interaction_id: Mapped[int] = mapped_column(
        BigId, ForeignKey("interactions.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    experience: Mapped[int] = mapped_column(Integer)
    priority: Mapped[float] = mapped_column(Float)


class ApiTokenRow(Base):
    """An API token; only the SHA-256 of the secret is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(Text)
    scope: Mapped[str] = mapped_column(Text)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


metadata = Base.metadata
interactions = InteractionRow.__table__
feedback = FeedbackRow.__table__
branches = BranchRow.__table__
branch_domains = BranchDomainRow.__table__
generations = GenerationRow.__table__
aliases = AliasRow.__table__
cycles = CycleRow.__table__
cycle_events = CycleEventRow.__table__
replay_members = ReplayMemberRow.__table__
api_tokens = ApiTokenRow.__table__
