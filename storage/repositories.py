"""Repositories: SQL in, frozen ``selftune.policies.records`` dataclasses out.

Use them through a unit of work, one database transaction::

    store = Store(make_engine(url))
    with store.transaction(write=True) as uow:  # commits on success, rolls back on any exception
        result = uow.interactions.add_batch(rows)

Every timestamp a repository writes comes from the store's ``clock`` (UTC, timezone-aware), never from
the database server, so tests can fix time and both backends store the same values. Everything is
SQLAlchemy Core on the tables of ``models``; the ingest path is one multi-row INSERT per batch.
"""

from __future__ import annotations

import builtins  # repositories have a list() method, which hides the builtin in their class bodies
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Dialect,
    Engine,
    Row,
    bindparam,
    cast,
    column,
    delete,
    func,
    select,
    table,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.expression import TableClause

from selftune.policies.errors import ConflictError, InvalidRecordError, NotFoundError
from selftune.policies.records import (
    FEEDBACK_KINDS,
    GENERATION_STATUSES,
    TOKEN_SCOPES,
    Alias,
    ApiToken,
    Branch,
    Cycle,
    CycleEvent,
    Feedback,
    FeedbackIn,
    Generation,
    IngestResult,
    Interaction,
    InteractionIn,
    Message,
    ReplayMember,
)

from . import models as m
from .db import BEGIN_MODE

Clock = Callable[[], datetime]
TOKEN_PREFIX = "st_"
# pg_advisory_xact_lock key that serialises ingest on PostgreSQL (see add_batch). Any fixed bigint.
_INGEST_LOCK_KEY = 0x5E1F_7E5E
_IN_CHUNK = 500
"""Ids per ``IN (...)`` list: far below every backend's bound-parameter limit."""


def utc_now() -> datetime:
    return datetime.now(UTC)


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
                yield UnitOfWork(connection, self.clock)


class UnitOfWork:
    """The repositories, all on one connection inside one transaction."""

    def __init__(self, connection: Connection, clock: Clock) -> None:
        self.connection = connection
        self.interactions = InteractionRepository(connection, clock)
        self.feedback = FeedbackRepository(connection, clock)
        self.branches = BranchRepository(connection, clock)
        self.generations = GenerationRepository(connection, clock)
        self.aliases = AliasRepository(connection, clock)
        self.cycles = CycleRepository(connection, clock)
        self.replay = ReplayRepository(connection, clock)
        self.tokens = TokenRepository(connection, clock)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested transaction: if the block raises, only its own writes are undone."""
        with self.connection.begin_nested():
            yield


class _Repository:
    def __init__(self, connection: Connection, clock: Clock) -> None:
        self.connection = connection
        self.clock = clock

    def _insert(self, into: TableClause) -> Any:
        """The dialect's INSERT, which knows ON CONFLICT (SQLite >= 3.35 and PostgreSQL)."""
        dialect = self.connection.dialect.name
        if dialect == "sqlite":
            return sqlite.insert(into)
        if dialect == "postgresql":
            return postgresql.insert(into)
        raise NotImplementedError(f"database {dialect!r} is not supported: use SQLite or PostgreSQL")

    def _exists(self, column: Any, value: object) -> bool:
        return self.connection.execute(select(column).where(column == value).limit(1)).first() is not None


def _chunks(values: Sequence[Any], size: int = _IN_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


# ---------------------------------------------------------------------------------------------------
# interactions and feedback


def _to_interaction(row: Row[Any]) -> Interaction:
    return Interaction(
        id=row.id,
        branch=row.branch,
        messages=tuple(Message(item["role"], item["content"]) for item in row.messages),
        created_at=row.created_at,
        source=row.source,
        content_hash=row.content_hash,
        external_id=row.external_id,
        domain=row.domain,
        tags=tuple(row.tags),
        metadata=dict(row._mapping["metadata"] or {}),
    )


def _to_feedback(row: Row[Any]) -> Feedback:
    return Feedback(
        id=row.id,
        interaction_id=row.interaction_id,
        kind=row.kind,
        created_at=row.created_at,
        thumbs_up=row.thumbs_up,
        score=row.score,
        corrected_response=row.corrected_response,
        chosen=row.chosen,
        rejected=row.rejected,
        comment=row.comment,
    )


def _feedback_values(interaction_id: int, item: FeedbackIn, now: datetime) -> dict[str, Any]:
    if item.kind not in FEEDBACK_KINDS:
        raise InvalidRecordError(
            f"feedback kind {item.kind!r} on interaction {interaction_id}: use one of {', '.join(FEEDBACK_KINDS)}"
        )
    return {
        "interaction_id": interaction_id,
        "kind": item.kind,
        "thumbs_up": item.thumbs_up,
        "score": item.score,
        "corrected_response": item.corrected_response,
        "chosen": item.chosen,
        "rejected": item.rejected,
        "comment": item.comment,
        "created_at": now,
    }


_INGEST_COLUMNS = (
    "id", "external_id", "branch", "domain", "tags", "messages", "created_at", "source", "content_hash",
    "dedupe_key", "metadata",
)  # fmt: skip
_JSON_COLUMNS = ("tags", "messages", "metadata")
_UNTYPED_INTERACTIONS = table("interactions", *(column(name) for name in _INGEST_COLUMNS))
"""``interactions`` without types: add_batch hands it values that are bind-processed already."""


def _bind_processor(column_: Column[Any], dialect: Dialect) -> Callable[[Any], Any]:
    """What SQLAlchemy would do to a value bound to ``column_`` (JSON encoding, UTC conversion, ...)."""
    processor = column_.type.dialect_impl(dialect).bind_processor(dialect)
    return processor if processor is not None else (lambda value: value)


class InteractionRepository(_Repository):
    table = m.interactions

    def add_batch(self, rows: Sequence[InteractionIn]) -> IngestResult:
        """Store the rows that are new to their branch; count the rest as duplicates.

        One multi-row ``INSERT ... ON CONFLICT (branch, dedupe_key) DO NOTHING RETURNING``: the
        database decides what is new, so concurrent ingests of the same rows count each row once.
        A row repeated inside ``rows`` is a duplicate too (the first one wins, with its feedback).
        Feedback of accepted rows is inserted in the same transaction; a duplicate's is dropped.
        """
        if not rows:
            return IngestResult()
        now = self.clock()
        first: dict[tuple[str, str], InteractionIn] = {}
        for row in rows:
            first.setdefault((row.branch, row.dedupe_key), row)
        new = [
            {
                "external_id": row.external_id,
                "branch": branch,
                "domain": row.domain,
                "tags": list(row.tags),
                "messages": [{"role": msg.role, "content": msg.content} for msg in row.messages],
                "source": row.source,
                "content_hash": row.content_hash,
                "dedupe_key": key,
                "metadata": row.metadata,
            }
            for (branch, key), row in first.items()
        ]
        if self.connection.dialect.name == "postgresql":
            inserted = self._insert_new_postgresql(new, now)
        else:
            inserted = self._insert_new_sqlite(new, now)
        feedback = [
            _feedback_values(row_id, item, now)
            for row_id, branch, key in inserted
            for item in first[(branch, key)].feedback
        ]
        if feedback:
            self.connection.execute(m.feedback.insert(), feedback)
        return IngestResult(accepted=len(inserted), duplicates=len(rows) - len(inserted))

    def _insert_new_sqlite(self, new: builtins.list[dict[str, Any]], now: datetime) -> Sequence[Row[Any]]:
        # Bind-process here, once per value, and insert through an untyped table: SQLAlchemy's own
        # per-parameter machinery cost 3x the SQLite work itself (28k rows/s with it, 85k without).
        dialect = self.connection.dialect
        to_json = _bind_processor(self.table.c.messages, dialect)
        created_at = _bind_processor(self.table.c.created_at, dialect)(now)
        for values in new:
            values["created_at"] = created_at
            for name in _JSON_COLUMNS:
                values[name] = to_json(values[name])
        t = _UNTYPED_INTERACTIONS
        statement = (
            sqlite.insert(t)
            .on_conflict_do_nothing(index_elements=[t.c.branch, t.c.dedupe_key])
            .returning(t.c.id, t.c.branch, t.c.dedupe_key)
        )
        # One statement per batch where the bound-parameter limit allows (SQLAlchemy splits it otherwise).
        options = {"insertmanyvalues_page_size": len(new)}
        return self.connection.execute(statement, new, execution_options=options).all()

    def _insert_new_postgresql(self, new: builtins.list[dict[str, Any]], now: datetime) -> Sequence[Row[Any]]:
        # PostgreSQL hands out ids before commit, so concurrent ingests could commit id 101 before
        # id 100 and a reader's "after id 101" cutoff would skip 100 forever. Serialising ingest
        # keeps ids in commit order, as SQLite's single writer does anyway.
        self.connection.execute(select(func.pg_advisory_xact_lock(_INGEST_LOCK_KEY)))
        # INSERT ... SELECT FROM unnest(one array per column): one small statement with ten parameters.
        # A multi-row VALUES of 50k placeholders spent 70% of the time in psycopg's query parser.
        t = self.table
        names = list(new[0])
        array_types = {name: ARRAY(t.c[name].type, dimensions=1) for name in names}  # JSON items stay whole
        arrays = [
            cast(bindparam(f"{name}_values", [v[name] for v in new], type_=array_types[name]), array_types[name])
            for name in names
        ]
        rows = func.unnest(*arrays).table_valued(*names).render_derived()
        created_at = bindparam("created_at", now, type_=t.c.created_at.type)
        statement = (
            postgresql.insert(t)
            .from_select([*names, "created_at"], select(*(rows.c[name] for name in names), created_at))
            .on_conflict_do_nothing(index_elements=[t.c.branch, t.c.dedupe_key])
            .returning(t.c.id, t.c.branch, t.c.dedupe_key)
        )
        return self.connection.execute(statement).all()

    def get(self, interaction_id: int) -> Interaction:
        row = self.connection.execute(select(self.table).where(self.table.c.id == interaction_id)).first()
        if row is None:
            raise NotFoundError(f"interaction {interaction_id} does not exist")
        return _to_interaction(row)

    def find_by_external_id(self, branch: str, external_id: str) -> Interaction | None:
        t = self.table
        key = f"id:{external_id}"  # the dedupe key of a row with an external id (records.InteractionIn)
        row = self.connection.execute(select(t).where(t.c.branch == branch, t.c.dedupe_key == key)).first()
        return None if row is None else _to_interaction(row)

    def list(
        self, branch: str | None = None, domain: str | None = None, after_id: int | None = None, limit: int = 100
    ) -> list[Interaction]:
        """Interactions in id order, after ``after_id`` (keyset pagination: pass the last id you got)."""
        t = self.table
        query = select(t).order_by(t.c.id).limit(limit)
        if branch is not None:
            query = query.where(t.c.branch == branch)
        if domain is not None:
            query = query.where(t.c.domain == domain)
        if after_id is not None:
            query = query.where(t.c.id > after_id)
        return [_to_interaction(row) for row in self.connection.execute(query)]

    def since(self, branch: str, after_id: int = 0, page: int = 1000) -> Iterator[Interaction]:
        """Every interaction of ``branch`` with an id above ``after_id``, in id order, read page by page.

        Consume it inside the transaction that made it.
        """
        while batch := self.list(branch=branch, after_id=after_id, limit=page):
            yield from batch
            after_id = batch[-1].id

    def count(self, branch: str | None = None) -> int:
        query = select(func.count()).select_from(self.table)
        if branch is not None:
            query = query.where(self.table.c.branch == branch)
        return int(self.connection.execute(query).scalar_one())

    def max_id(self, branch: str | None = None) -> int | None:
        """The newest interaction id (of ``branch``), or None if there is none: a cutoff for ``since``."""
        query = select(func.max(self.table.c.id))
        if branch is not None:
            query = query.where(self.table.c.branch == branch)
        return self.connection.execute(query).scalar_one()

    def count_by_branch_domain(self) -> builtins.list[tuple[str, str | None, int]]:
        """(branch, domain, count) for every pair that has rows; rows without a domain come first."""
        t = self.table
        query = (
            select(t.c.branch, t.c.domain, func.count())
            .group_by(t.c.branch, t.c.domain)
            .order_by(t.c.branch, t.c.domain.asc().nulls_first())
        )
        return [(branch, domain, int(n)) for branch, domain, n in self.connection.execute(query)]


class FeedbackRepository(_Repository):
    table = m.feedback

    def add(self, interaction_id: int, item: FeedbackIn) -> Feedback:
        if not self._exists(m.interactions.c.id, interaction_id):
            raise NotFoundError(f"interaction {interaction_id} does not exist: feedback needs an existing interaction")
        values = _feedback_values(interaction_id, item, self.clock())
        row_id = self.connection.execute(self.table.insert().returning(self.table.c.id), values).scalar_one()
        return Feedback(id=row_id, **values)

    def for_interaction(self, interaction_id: int) -> list[Feedback]:
        t = self.table
        rows = self.connection.execute(select(t).where(t.c.interaction_id == interaction_id).order_by(t.c.id))
        return [_to_feedback(row) for row in rows]

    def for_interactions(self, interaction_ids: Sequence[int]) -> dict[int, list[Feedback]]:
        """Feedback of many interactions at once (those without any are absent), each list in id order."""
        t = self.table
        out: dict[int, list[Feedback]] = {}
        for chunk in _chunks(sorted(set(interaction_ids))):
            rows = self.connection.execute(select(t).where(t.c.interaction_id.in_(chunk)).order_by(t.c.id))
            for row in rows:
                out.setdefault(row.interaction_id, []).append(_to_feedback(row))
        return out


# ---------------------------------------------------------------------------------------------------
# branches, generations, aliases


def _to_branch(row: Row[Any]) -> Branch:
    return Branch(
        name=row.name, created_at=row.created_at, root_generation_id=row.root_generation_id, domain=row.domain
    )


def _to_generation(row: Row[Any]) -> Generation:
    return Generation(
        id=row.id,
        branch=row.branch,
        status=row.status,
        path=row.path,
        checksum=row.checksum,
        params=row.params,
        created_at=row.created_at,
        parent_id=row.parent_id,
        cycle_id=row.cycle_id,
        metrics=dict(row.metrics or {}),
    )


def _check_status(status: str) -> None:
    if status not in GENERATION_STATUSES:
        raise InvalidRecordError(f"generation status {status!r}: use one of {', '.join(GENERATION_STATUSES)}")


class BranchRepository(_Repository):
    table = m.branches

    def create(self, name: str, root_generation_id: int | None = None, domain: str | None = None) -> Branch:
        if self._exists(self.table.c.name, name):
            raise ConflictError(f"branch {name!r} exists already: pick another name")
        if root_generation_id is not None and not self._exists(m.generations.c.id, root_generation_id):
            raise NotFoundError(
                f"generation {root_generation_id} does not exist: a branch must fork from one that does"
            )
        branch = Branch(name=name, created_at=self.clock(), root_generation_id=root_generation_id, domain=domain)
        self.connection.execute(
            self.table.insert(),
            {"name": name, "created_at": branch.created_at, "root_generation_id": root_generation_id, "domain": domain},
        )
        return branch

    def find(self, name: str) -> Branch | None:
        row = self.connection.execute(select(self.table).where(self.table.c.name == name)).first()
        return None if row is None else _to_branch(row)

    def get(self, name: str) -> Branch:
        branch = self.find(name)
        if branch is None:
            raise NotFoundError(f"branch {name!r} does not exist: create it first (selftune branch create)")
        return branch

    def list(self) -> list[Branch]:
        return [_to_branch(row) for row in self.connection.execute(select(self.table).order_by(self.table.c.name))]

    def set_root(self, name: str, generation_id: int) -> Branch:
        """Point a branch at its root generation (generation 0 of ``main`` is made after its branch)."""
        self.get(name)
        if not self._exists(m.generations.c.id, generation_id):
            raise NotFoundError(f"generation {generation_id} does not exist")
        self.connection.execute(
            update(self.table).where(self.table.c.name == name).values(root_generation_id=generation_id)
        )
        return self.get(name)


class GenerationRepository(_Repository):
    table = m.generations

    def add(
        self,
        branch: str,
        path: str,
        checksum: str,
        params: int,
        *,
        parent_id: int | None = None,
        status: str = "candidate",
        metrics: dict[str, Any] | None = None,
        cycle_id: int | None = None,
        id: int | None = None,  # noqa: A002 - mirrors the column
    ) -> Generation:
        """Record a generation with the next id (0 for the very first: the foundation), or ``id`` if given."""
        _check_status(status)
        if not self._exists(m.branches.c.name, branch):
            raise NotFoundError(f"branch {branch!r} does not exist: create it before adding generations to it")
        if parent_id is not None and not self._exists(self.table.c.id, parent_id):
            raise NotFoundError(f"parent generation {parent_id} does not exist")
        if id is None:
            id = self.connection.execute(select(func.coalesce(func.max(self.table.c.id) + 1, 0))).scalar_one()
        elif self._exists(self.table.c.id, id):
            raise ConflictError(f"generation {id} exists already: leave id out to get the next free one")
        generation = Generation(
            id=id,
            branch=branch,
            status=status,
            path=path,
            checksum=checksum,
            params=params,
            created_at=self.clock(),
            parent_id=parent_id,
            cycle_id=cycle_id,
            metrics=dict(metrics or {}),
        )
        self.connection.execute(
            self.table.insert(),
            {
                "id": generation.id,
                "branch": branch,
                "status": status,
                "path": path,
                "checksum": checksum,
                "params": params,
                "created_at": generation.created_at,
                "parent_id": parent_id,
                "cycle_id": cycle_id,
                "metrics": generation.metrics,
            },
        )
        return generation

    def find(self, generation_id: int) -> Generation | None:
        row = self.connection.execute(select(self.table).where(self.table.c.id == generation_id)).first()
        return None if row is None else _to_generation(row)

    def get(self, generation_id: int) -> Generation:
        generation = self.find(generation_id)
        if generation is None:
            raise NotFoundError(f"generation {generation_id} does not exist (selftune generations lists them)")
        return generation

    def list(self, branch: str | None = None) -> list[Generation]:
        query = select(self.table).order_by(self.table.c.id)
        if branch is not None:
            query = query.where(self.table.c.branch == branch)
        return [_to_generation(row) for row in self.connection.execute(query)]

    def children(self, generation_id: int) -> builtins.list[Generation]:
        t = self.table
        rows = self.connection.execute(select(t).where(t.c.parent_id == generation_id).order_by(t.c.id))
        return [_to_generation(row) for row in rows]

    def ancestors(self, generation_id: int) -> builtins.list[Generation]:
        """The generation and its parents up to the root, nearest first."""
        chain = [self.get(generation_id)]
        while chain[-1].parent_id is not None:
            chain.append(self.get(chain[-1].parent_id))
        return chain

    def update(
        self,
        generation_id: int,
        *,
        status: str | None = None,
        path: str | None = None,
        checksum: str | None = None,
        params: int | None = None,
        metrics: dict[str, Any] | None = None,
        cycle_id: int | None = None,
    ) -> Generation:
        """Change the given fields (None leaves one as it is); returns the updated generation."""
        changes: dict[str, Any] = {
            key: value
            for key, value in {
                "status": status,
                "path": path,
                "checksum": checksum,
                "params": params,
                "metrics": metrics,
                "cycle_id": cycle_id,
            }.items()
            if value is not None
        }
        if status is not None:
            _check_status(status)
        self.get(generation_id)
        if changes:
            self.connection.execute(update(self.table).where(self.table.c.id == generation_id).values(**changes))
        return self.get(generation_id)

    def set_status(self, generation_id: int, status: str) -> Generation:
        return self.update(generation_id, status=status)


def _to_alias(row: Row[Any]) -> Alias:
    return Alias(branch=row.branch, name=row.name, generation_id=row.generation_id, updated_at=row.updated_at)


class AliasRepository(_Repository):
    table = m.aliases

    def set(self, branch: str, name: str, generation_id: int) -> Alias:
        """Point ``branch``'s alias ``name`` at a generation: one upsert, so the move is atomic."""
        if not self._exists(m.branches.c.name, branch):
            raise NotFoundError(f"branch {branch!r} does not exist")
        if not self._exists(m.generations.c.id, generation_id):
            raise NotFoundError(f"generation {generation_id} does not exist: alias {branch}/{name} was not moved")
        alias = Alias(branch=branch, name=name, generation_id=generation_id, updated_at=self.clock())
        statement = self._insert(self.table).values(
            branch=branch, name=name, generation_id=generation_id, updated_at=alias.updated_at
        )
        statement = statement.on_conflict_do_update(
            index_elements=[self.table.c.branch, self.table.c.name],
            set_={"generation_id": statement.excluded.generation_id, "updated_at": statement.excluded.updated_at},
        )
        self.connection.execute(statement)
        return alias

    def get(self, branch: str, name: str) -> Alias | None:
        t = self.table
        row = self.connection.execute(select(t).where(t.c.branch == branch, t.c.name == name)).first()
        return None if row is None else _to_alias(row)

    def list(self, branch: str | None = None) -> list[Alias]:
        t = self.table
        query = select(t).order_by(t.c.branch, t.c.name)
        if branch is not None:
            query = query.where(t.c.branch == branch)
        return [_to_alias(row) for row in self.connection.execute(query)]

    def remove(self, branch: str, name: str) -> bool:
        """Drop an alias; True if there was one."""
        t = self.table
        return self.connection.execute(delete(t).where(t.c.branch == branch, t.c.name == name)).rowcount > 0


# ---------------------------------------------------------------------------------------------------
# cycles


def _to_cycle(row: Row[Any]) -> Cycle:
    return Cycle(
        id=row.id,
        branch=row.branch,
        state=row.state,
        created_at=row.created_at,
        parent_generation_id=row.parent_generation_id,
        generation_id=row.generation_id,
        finished_at=row.finished_at,
        outcome=row.outcome,
        error=row.error,
    )


def _to_event(row: Row[Any]) -> CycleEvent:
    return CycleEvent(
        id=row.id,
        cycle_id=row.cycle_id,
        step=row.step,
        outcome=row.outcome,
        started_at=row.started_at,
        finished_at=row.finished_at,
        detail=dict(row.detail or {}),
    )


class CycleRepository(_Repository):
    table = m.cycles

    def create(self, branch: str, state: str, parent_generation_id: int | None = None) -> Cycle:
        if not self._exists(m.branches.c.name, branch):
            raise NotFoundError(f"branch {branch!r} does not exist")
        if parent_generation_id is not None and not self._exists(m.generations.c.id, parent_generation_id):
            raise NotFoundError(f"parent generation {parent_generation_id} does not exist")
        values = {
            "branch": branch,
            "state": state,
            "parent_generation_id": parent_generation_id,
            "created_at": self.clock(),
        }
        cycle_id = self.connection.execute(self.table.insert().returning(self.table.c.id), values).scalar_one()
        return Cycle(id=cycle_id, **values)

    def get(self, cycle_id: int) -> Cycle:
        row = self.connection.execute(select(self.table).where(self.table.c.id == cycle_id)).first()
        if row is None:
            raise NotFoundError(f"cycle {cycle_id} does not exist")
        return _to_cycle(row)

    def list(self, branch: str | None = None, unfinished_only: bool = False) -> list[Cycle]:
        """Cycles in id order; ``unfinished_only`` gives the ones to resume after a crash."""
        t = self.table
        query = select(t).order_by(t.c.id)
        if branch is not None:
            query = query.where(t.c.branch == branch)
        if unfinished_only:
            query = query.where(t.c.finished_at.is_(None))
        return [_to_cycle(row) for row in self.connection.execute(query)]

    def _change(self, cycle_id: int, **values: Any) -> Cycle:
        self.get(cycle_id)
        self.connection.execute(update(self.table).where(self.table.c.id == cycle_id).values(**values))
        return self.get(cycle_id)

    def set_state(self, cycle_id: int, state: str) -> Cycle:
        return self._change(cycle_id, state=state)

    def set_generation(self, cycle_id: int, generation_id: int) -> Cycle:
        if not self._exists(m.generations.c.id, generation_id):
            raise NotFoundError(f"generation {generation_id} does not exist")
        return self._change(cycle_id, generation_id=generation_id)

    def finish(self, cycle_id: int, outcome: str, error: str | None = None, state: str | None = None) -> Cycle:
        """Mark a cycle finished now with its outcome (and error); ``state`` too, if given."""
        if self.get(cycle_id).finished_at is not None:
            raise ConflictError(f"cycle {cycle_id} is finished already")
        values: dict[str, Any] = {"finished_at": self.clock(), "outcome": outcome, "error": error}
        if state is not None:
            values["state"] = state
        return self._change(cycle_id, **values)

    def add_event(
        self,
        cycle_id: int,
        step: str,
        outcome: str,
        *,
        started_at: datetime | None = None,
        finished_at: datetime | None = None,
        detail: dict[str, Any] | None = None,
    ) -> CycleEvent:
        """Record one step; its start defaults to now (pass the measured times when you have them)."""
        self.get(cycle_id)
        values = {
            "cycle_id": cycle_id,
            "step": step,
            "outcome": outcome,
            "started_at": started_at or self.clock(),
            "finished_at": finished_at,
            "detail": dict(detail or {}),
        }
        event_id = self.connection.execute(m.cycle_events.insert().returning(m.cycle_events.c.id), values).scalar_one()
        return CycleEvent(id=event_id, **values)

    def finish_event(self, event_id: int, outcome: str, detail: dict[str, Any] | None = None) -> CycleEvent:
        """Close a step recorded as started: its outcome, now as its end, and (if given) new details."""
        t = m.cycle_events
        values: dict[str, Any] = {"outcome": outcome, "finished_at": self.clock()}
        if detail is not None:
            values["detail"] = dict(detail)
        if self.connection.execute(update(t).where(t.c.id == event_id).values(**values)).rowcount == 0:
            raise NotFoundError(f"cycle event {event_id} does not exist")
        return _to_event(self.connection.execute(select(t).where(t.c.id == event_id)).one())

    def events(self, cycle_id: int) -> builtins.list[CycleEvent]:
        t = m.cycle_events
        rows = self.connection.execute(select(t).where(t.c.cycle_id == cycle_id).order_by(t.c.id))
        return [_to_event(row) for row in rows]


# ---------------------------------------------------------------------------------------------------
# replay buffer


class ReplayRepository(_Repository):
    table = m.replay_members

    def add_many(self, members: Sequence[ReplayMember]) -> int:
        """Put interactions in their branch's buffer; a member already there gets the new experience and priority."""
        if not members:
            return 0
        ids = sorted({member.interaction_id for member in members})
        found: set[int] = set()
        for chunk in _chunks(ids):
            query = select(m.interactions.c.id).where(m.interactions.c.id.in_(chunk))
            found.update(self.connection.execute(query).scalars())
        if missing := [i for i in ids if i not in found]:
            raise NotFoundError(f"interaction(s) {missing[:10]} do not exist: only stored interactions can be replayed")
        statement = self._insert(self.table)
        statement = statement.on_conflict_do_update(
            index_elements=[self.table.c.branch, self.table.c.interaction_id],
            set_={"experience": statement.excluded.experience, "priority": statement.excluded.priority},
        )
        rows = [
            {"branch": x.branch, "interaction_id": x.interaction_id, "experience": x.experience, "priority": x.priority}
            for x in members
        ]
        self.connection.execute(statement, rows)
        return len(members)

    def members(self, branch: str) -> list[ReplayMember]:
        t = self.table
        rows = self.connection.execute(select(t).where(t.c.branch == branch).order_by(t.c.interaction_id))
        return [ReplayMember(row.branch, row.interaction_id, row.experience, row.priority) for row in rows]

    def count(self, branch: str) -> int:
        t = self.table
        query = select(func.count()).select_from(t).where(t.c.branch == branch)
        return int(self.connection.execute(query).scalar_one())

    def remove(self, branch: str, interaction_ids: Sequence[int]) -> int:
        """Evict members of ``branch``'s buffer; returns how many were there."""
        t = self.table
        removed = 0
        for chunk in _chunks(sorted(set(interaction_ids))):
            result = self.connection.execute(delete(t).where(t.c.branch == branch, t.c.interaction_id.in_(chunk)))
            removed += result.rowcount
        return removed


# ---------------------------------------------------------------------------------------------------
# API tokens


def hash_token(plaintext: str) -> str:
    """SHA-256 hex of a token. Tokens are 256-bit random, so a fast unsalted hash is the right tool."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def _to_token(row: Row[Any]) -> ApiToken:
    return ApiToken(id=row.id, name=row.name, scope=row.scope, created_at=row.created_at, revoked_at=row.revoked_at)


class TokenRepository(_Repository):
    table = m.api_tokens

    def create(self, name: str, scope: str) -> tuple[ApiToken, str]:
        """A new token: the record and the plaintext, which is shown once and never stored."""
        if scope not in TOKEN_SCOPES:
            raise InvalidRecordError(f"token scope {scope!r}: use one of {', '.join(TOKEN_SCOPES)}")
        plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
        values = {"name": name, "scope": scope, "token_hash": hash_token(plaintext), "created_at": self.clock()}
        token_id = self.connection.execute(self.table.insert().returning(self.table.c.id), values).scalar_one()
        return ApiToken(id=token_id, name=name, scope=scope, created_at=values["created_at"]), plaintext

    def verify(self, plaintext: str) -> ApiToken | None:
        """The live token whose secret this is, or None (unknown or revoked)."""
        digest = hash_token(plaintext)
        row = self.connection.execute(select(self.table).where(self.table.c.token_hash == digest)).first()
        # The lookup is by hash, so it leaks nothing about the secret; compare_digest guards the final
        # check anyway (and answers the same for "unknown" and "revoked" in kind, if not in time).
        if row is None or not hmac.compare_digest(row.token_hash, digest) or row.revoked_at is not None:
            return None
        return _to_token(row)

    def revoke(self, token_id: int) -> ApiToken:
        """Revoke a token (again is a no-op that keeps the first revocation time)."""
        t = self.table
        self.connection.execute(
            update(t).where(t.c.id == token_id, t.c.revoked_at.is_(None)).values(revoked_at=self.clock())
        )
        row = self.connection.execute(select(t).where(t.c.id == token_id)).first()
        if row is None:
            raise NotFoundError(f"API token {token_id} does not exist (selftune token list shows them)")
        return _to_token(row)

    def list(self) -> list[ApiToken]:
        return [_to_token(row) for row in self.connection.execute(select(self.table).order_by(self.table.c.id))]
