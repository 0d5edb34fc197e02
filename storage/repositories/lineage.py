"""The lineage: branches, the generations on them (a tree through ``parent_id``) and the aliases that point into it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Row, delete, func, select, update

from selftune.policies.errors import ConflictError, InvalidRecordError, NotFoundError
from selftune.policies.records import GENERATION_STATUSES, Alias, Branch, Generation

from .. import models as m
from .base import Repository


def _to_branch(row: Row[Any], domains: tuple[str, ...]) -> Branch:
    return Branch(name=row.name, created_at=row.created_at, root_generation_id=row.root_generation_id,
                  domains=domains, settings=dict(row.settings or {}))


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


class SqlBranchRepository(Repository):
    table = m.branches

    def create(self, name: str, root_generation_id: int | None = None, domains: Sequence[str] = (),
               settings: Mapping[str, Any] | None = None) -> Branch:
        """A new branch; ``domains`` (its scope) must be claimed by no other branch."""
        if self._exists(self.table.c.name, name):
            raise ConflictError(f"branch {name!r} exists already: pick another name")
        if root_generation_id is not None and not self._exists(m.generations.c.id, root_generation_id):
            raise NotFoundError(
                f"generation {root_generation_id} does not exist: a branch must fork from one that does"
            )
        scope = _scope(domains)
        taken = self.connection.execute(
            select(m.branch_domains.c.domain, m.branch_domains.c.branch)
            .where(m.branch_domains.c.domain.in_(scope)).order_by(m.branch_domains.c.domain)
        ).first()
        if taken is not None:
            raise ConflictError(f"domain {taken.domain!r} is routed to branch {taken.branch!r} already: "
                                "a domain belongs to one branch; leave it out or pick another domain")
        branch = Branch(name=name, created_at=self.clock(), root_generation_id=root_generation_id,
                        domains=scope, settings=dict(settings or {}))
        self.connection.execute(
            self.table.insert(),
            {"name": name, "created_at": branch.created_at, "root_generation_id": root_generation_id,
             "settings": branch.settings},
        )
        if scope:
            self.connection.execute(m.branch_domains.insert(), [{"domain": d, "branch": name} for d in scope])
        return branch

    def find(self, name: str) -> Branch | None:
        row = self.connection.execute(select(self.table).where(self.table.c.name == name)).first()
        return None if row is None else _to_branch(row, self._domains(name).get(name, ()))

    def get(self, name: str) -> Branch:
        branch = self.find(name)
        if branch is None:
            raise NotFoundError(f"branch {name!r} does not exist: create it first (selftune branch create)")
        return branch

    def list(self) -> list[Branch]:
        domains = self._domains()
        rows = self.connection.execute(select(self.table).order_by(self.table.c.name))
        return [_to_branch(row, domains.get(row.name, ())) for row in rows]

    def set_root(self, name: str, generation_id: int) -> Branch:
        """Point a branch at its root generation (generation 0 of ``main`` is made after its branch)."""
        self.get(name)
        if not self._exists(m.generations.c.id, generation_id):
            raise NotFoundError(f"generation {generation_id} does not exist")
        self.connection.execute(
            update(self.table).where(self.table.c.name == name).values(root_generation_id=generation_id)
        )
        return self.get(name)

    def set_settings(self, name: str, settings: Mapping[str, Any]) -> Branch:
        """Replace the branch's stored settings document (the caller has validated it)."""
        self.get(name)
        self.connection.execute(update(self.table).where(self.table.c.name == name).values(settings=dict(settings)))
        return self.get(name)

    def _domains(self, name: str | None = None) -> dict[str, tuple[str, ...]]:
        """Each branch's scope, its domains in alphabetical order."""
        t = m.branch_domains
        query = select(t.c.branch, t.c.domain).order_by(t.c.branch, t.c.domain)
        if name is not None:
            query = query.where(t.c.branch == name)
        out: dict[str, list[str]] = {}
        for row in self.connection.execute(query):
            out.setdefault(row.branch, []).append(row.domain)
        return {branch: tuple(domains) for branch, domains in out.items()}


def _scope(domains: Sequence[str]) -> tuple[str, ...]:
    """The domains without repeats, in alphabetical order; an empty name is refused."""
    if isinstance(domains, str):  # a single name would be split into its letters
        raise InvalidRecordError(f"domains={domains!r}: pass a list of domain names, e.g. [{domains!r}]")
    for domain in domains:
        if not isinstance(domain, str) or not domain.strip():
            raise InvalidRecordError(f"domain {domain!r}: a domain is a non-empty name, e.g. 'chemistry'")
    return tuple(sorted(set(domains)))


class SqlGenerationRepository(Repository):
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


class SqlAliasRepository(Repository):
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
