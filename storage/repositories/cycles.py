"""Cycles and their step events: what a cycle did, step by step, and how it ended."""

from __future__ import annotations

import builtins  # repositories have a list() method, which hides the builtin in their class bodies
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select, update

from selftune.policies.errors import ConflictError, NotFoundError
from selftune.policies.records import Cycle, CycleEvent

from .. import models as m
from .base import Repository


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


class SqlCycleRepository(Repository):
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
