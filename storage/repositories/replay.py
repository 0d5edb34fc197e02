"""The replay buffer: per branch, the stored interactions that later cycles rehearse."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, select

from selftune.policies.errors import NotFoundError
from selftune.policies.records import ReplayMember

from .. import models as m
from .base import Repository, chunks


class SqlReplayRepository(Repository):
    table = m.replay_members

    def add_many(self, members: Sequence[ReplayMember]) -> int:
        """Put interactions in their branch's buffer; a member already there gets the new experience and priority."""
        if not members:
            return 0
        ids = sorted({member.interaction_id for member in members})
        found: set[int] = set()
        for chunk in chunks(ids):
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

    def remove(self, branch: str, interaction_ids: Sequence[int]) -> int:
        """Evict members of ``branch``'s buffer; returns how many were there."""
        t = self.table
        removed = 0
        for chunk in chunks(sorted(set(interaction_ids))):
            result = self.connection.execute(delete(t).where(t.c.branch == branch, t.c.interaction_id.in_(chunk)))
            removed += result.rowcount
        return removed
