"""Interactions and their feedback: the ingest path (one multi-row INSERT per batch) and the reads."""

from __future__ import annotations

import builtins  # repositories have a list() method, which hides the builtin in their class bodies
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Dialect, Row, bindparam, cast, column, func, select, table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY

from selftune.policies.errors import ConflictError, InvalidRecordError, NotFoundError
from selftune.policies.records import (
    FEEDBACK_KINDS,
    MAX_CONFLICT_IDS,
    Feedback,
    FeedbackIn,
    IngestResult,
    Interaction,
    InteractionIn,
    Message,
)

from .. import models as m
from .base import Repository, chunks

# pg_advisory_xact_lock key that serialises ingest on PostgreSQL (see add_batch). Any fixed bigint.
_INGEST_LOCK_KEY = 0x5E1F_7E5E
MAX_FEEDBACK_PER_INTERACTION = 100
"""Most feedback items one interaction may hold: selection reads only the latest of each kind, and an unbounded
pile made every read of the interaction slow."""
_FEEDBACK_FIELDS = ("kind", "thumbs_up", "score", "corrected_response", "chosen", "rejected", "comment")


def _to_interaction(row: Row[Any]) -> Interaction:
    return Interaction(
        id=row.id,
        branch=row.branch,
        messages=tuple(Message.from_dict(item) for item in row.messages),
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


def _feedback_key(item: Feedback | FeedbackIn) -> tuple[Any, ...]:
    """What makes two feedback items the same judgement (re-ingesting a row does not repeat its feedback)."""
    return tuple(getattr(item, name) for name in _FEEDBACK_FIELDS)


def _check_feedback_cap(interaction: str, stored: int, adding: int) -> None:
    if stored + adding > MAX_FEEDBACK_PER_INTERACTION:
        raise ConflictError(
            f"{interaction} has {stored} feedback item(s); {adding} more would pass the cap of "
            f"{MAX_FEEDBACK_PER_INTERACTION} per interaction: send only the latest judgement (selection reads the "
            "latest thumbs, score and correction)"
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


class SqlInteractionRepository(Repository):
    table = m.interactions

    def add_batch(self, rows: Sequence[InteractionIn]) -> IngestResult:
        """Store the rows that are new to their branch; count the rest as duplicates.

        One multi-row ``INSERT ... ON CONFLICT (branch, dedupe_key) DO NOTHING RETURNING``: the
        database decides what is new, so concurrent ingests of the same rows count each row once.
        A row repeated inside ``rows`` is a duplicate too (the first one wins, with its feedback).
        Feedback of accepted rows is inserted in the same transaction. A duplicate with an external id
        brings its feedback to the stored row (feedback after the fact; an item the row already has is not
        repeated), unless its messages differ from the stored ones: then it is a conflict, counted and named,
        and nothing of it is written. A duplicate without an id is known only by its content: its feedback
        is dropped.
        """
        if not rows:
            return IngestResult()
        now = self.clock()
        first: dict[tuple[str, str], InteractionIn] = {}
        for row in rows:
            if len(row.feedback) > MAX_FEEDBACK_PER_INTERACTION:
                _check_feedback_cap(f"row {row.external_id or row.messages[0].content[:40]!r}", 0, len(row.feedback))
            first.setdefault((row.branch, row.dedupe_key), row)
        new = [
            {
                "external_id": row.external_id,
                "branch": branch,
                "domain": row.domain,
                "tags": list(row.tags),
                "messages": [msg.as_dict() for msg in row.messages],
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
        feedback = {row_id: builtins.list(first[(branch, key)].feedback) for row_id, branch, key in inserted}
        later = self._feedback_after_the_fact(rows, first, inserted, feedback)
        values = [_feedback_values(row_id, item, now) for row_id, items in feedback.items() for item in items]
        if values:
            self.connection.execute(m.feedback.insert(), values)
        return IngestResult(accepted=len(inserted), duplicates=len(rows) - len(inserted) - later.conflicts,
                            feedback=later.feedback, conflicts=later.conflicts,
                            conflict_ids=later.conflict_ids[:MAX_CONFLICT_IDS])

    def _feedback_after_the_fact(
        self, rows: Sequence[InteractionIn], first: dict[tuple[str, str], InteractionIn],
        inserted: Sequence[Row[Any]], feedback: dict[int, builtins.list[FeedbackIn]],
    ) -> IngestResult:
        """Add to ``feedback`` (interaction id -> items to store) the new feedback of rows repeated under an
        external id; the result counts those items and names the rows whose messages conflict."""
        new = {(branch, key): row_id for row_id, branch, key in inserted}
        repeats = [row for row in rows if row.external_id is not None
                   and (first[(row.branch, row.dedupe_key)] is not row or (row.branch, row.dedupe_key) not in new)]
        if not repeats:
            return IngestResult()
        stored = {key: (row_id, first[key].content_hash) for key, row_id in new.items()}
        stored.update(self._stored_hashes({(r.branch, r.dedupe_key) for r in repeats} - stored.keys()))
        conflicts: builtins.list[str] = []
        offered: dict[int, builtins.list[FeedbackIn]] = {}
        for row in repeats:
            row_id, content_hash = stored[(row.branch, row.dedupe_key)]
            if row.content_hash != content_hash:
                conflicts.append(str(row.external_id))
            elif row.feedback:
                offered.setdefault(row_id, []).extend(row.feedback)
        had = SqlFeedbackRepository(self.connection, self.clock).for_interactions(builtins.list(offered))
        added = 0
        for row_id, items in offered.items():
            mine = feedback.setdefault(row_id, [])
            seen = {_feedback_key(f) for f in (*had.get(row_id, ()), *mine)}
            fresh = [item for item in dict.fromkeys(items) if _feedback_key(item) not in seen]
            _check_feedback_cap(f"interaction {row_id}", len(had.get(row_id, ())) + len(mine), len(fresh))
            mine.extend(fresh)
            added += len(fresh)
        return IngestResult(feedback=added, conflicts=len(conflicts), conflict_ids=tuple(conflicts))

    def _stored_hashes(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], tuple[int, str]]:
        """(branch, dedupe key) -> (id, content hash) of stored rows, locked until the transaction ends (so that
        concurrent feedback cannot pass the cap)."""
        t = self.table
        out: dict[tuple[str, str], tuple[int, str]] = {}
        for branch in {b for b, _ in keys}:
            for chunk in chunks(sorted(k for b, k in keys if b == branch)):
                query = (select(t.c.id, t.c.dedupe_key, t.c.content_hash)
                         .where(t.c.branch == branch, t.c.dedupe_key.in_(chunk)).with_for_update())
                rows = self.connection.execute(query)
                out.update({(branch, key): (row_id, content_hash) for row_id, key, content_hash in rows})
        return out

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

    def count_after(
        self, branch: str, after_id: int = 0, *, created_after: datetime | None = None, at_most: int | None = None
    ) -> int:
        """How many interactions of ``branch`` have an id above ``after_id`` (and, if given, were created after
        ``created_after``), counting no further than ``at_most``.

        With ``at_most`` it reads only the branch's ``at_most`` newest rows (an index range, however large the
        table): ids grow in commit order and so do creation times, so the rows that pass are the newest ones.
        """
        t = self.table
        newest = select(t.c.created_at).where(t.c.branch == branch, t.c.id > after_id)
        if at_most is not None:
            newest = newest.order_by(t.c.id.desc()).limit(at_most)
        rows = newest.subquery()
        query = select(func.count()).select_from(rows)
        if created_after is not None:
            query = query.where(rows.c.created_at > created_after)
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


class SqlFeedbackRepository(Repository):
    table = m.feedback

    def add(self, interaction_id: int, item: FeedbackIn) -> Feedback:
        """Attach feedback; the interaction's row stays locked to the end of the transaction, so that concurrent
        feedback cannot pass ``MAX_FEEDBACK_PER_INTERACTION``."""
        interactions = m.interactions
        locked = select(interactions.c.id).where(interactions.c.id == interaction_id).with_for_update()
        if self.connection.execute(locked).first() is None:
            raise NotFoundError(f"interaction {interaction_id} does not exist: feedback needs an existing interaction")
        stored = select(func.count()).where(self.table.c.interaction_id == interaction_id)
        _check_feedback_cap(f"interaction {interaction_id}", self.connection.execute(stored).scalar_one(), 1)
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
        for chunk in chunks(sorted(set(interaction_ids))):
            rows = self.connection.execute(select(t).where(t.c.interaction_id.in_(chunk)).order_by(t.c.id))
            for row in rows:
                out.setdefault(row.interaction_id, []).append(_to_feedback(row))
        return out
