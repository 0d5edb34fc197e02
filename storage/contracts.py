"""What a unit of work offers its callers: the repositories and their methods, as typing protocols.

``Store.transaction()`` yields a ``UnitOfWork``; code outside storage annotates with these types and
never sees a connection or SQL. The SQL implementations (``repositories``) are checked against this
contract method by method (tests/storage/test_store_contract.py), and the contract's behaviour by one
test body run on SQLite and PostgreSQL. Every record in and out is a ``selftune.policies.records``
dataclass; a missing record raises ``NotFoundError``, a clash ``ConflictError``, a bad value
``InvalidRecordError``.
"""

from __future__ import annotations

import builtins  # repositories have a list() method, which hides the builtin in their class bodies
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from selftune.policies.records import (
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
    ReplayMember,
)


class InteractionRepository(Protocol):
    def add_batch(self, rows: Sequence[InteractionIn]) -> IngestResult:
        """Store the rows new to their branch (with their feedback); count the rest, repeats in ``rows`` too,
        as duplicates. Concurrent ingests of the same rows count each row once. A duplicate under an external id
        adds its feedback that the stored row lacks (``feedback`` counts it); one whose messages differ is a
        conflict (``conflicts``, ``conflict_ids``), not written. Past the feedback cap of an interaction:
        ``ConflictError``."""

    def get(self, interaction_id: int) -> Interaction: ...

    def find_by_external_id(self, branch: str, external_id: str) -> Interaction | None: ...

    def list(
        self, branch: str | None = None, domain: str | None = None, after_id: int | None = None, limit: int = 100
    ) -> builtins.list[Interaction]:
        """Interactions in id order, after ``after_id`` (keyset pagination: pass the last id you got)."""

    def since(self, branch: str, after_id: int = 0, page: int = 1000) -> Iterator[Interaction]:
        """Every interaction of ``branch`` above ``after_id``, in id order; consume it inside the transaction."""

    def count_after(
        self, branch: str, after_id: int = 0, *, created_after: datetime | None = None, at_most: int | None = None
    ) -> int:
        """How many interactions of ``branch`` are above ``after_id`` (and created after ``created_after``),
        counting no further than ``at_most``."""

    def max_id(self, branch: str | None = None) -> int | None:
        """The newest interaction id (of ``branch``), or None if there is none: a cutoff for ``since``."""

    def count_by_branch_domain(self) -> builtins.list[tuple[str, str | None, int]]:
        """(branch, domain, count) for every pair that has rows; rows without a domain come first."""


class FeedbackRepository(Protocol):
    def add(self, interaction_id: int, item: FeedbackIn) -> Feedback:
        """Attach feedback; ``ConflictError`` (naming the interaction and the cap) once it holds the most allowed."""

    def for_interaction(self, interaction_id: int) -> list[Feedback]: ...

    def for_interactions(self, interaction_ids: Sequence[int]) -> dict[int, list[Feedback]]:
        """Feedback of many interactions at once (those without any are absent), each list in id order."""


class BranchRepository(Protocol):
    def create(self, name: str, root_generation_id: int | None = None, domains: Sequence[str] = (),
               settings: Mapping[str, Any] | None = None) -> Branch:
        """A new branch; ``domains`` (its scope) must be claimed by no other branch (``ConflictError`` names
        the branch that has one)."""

    def find(self, name: str) -> Branch | None: ...

    def get(self, name: str) -> Branch: ...

    def list(self) -> builtins.list[Branch]: ...

    def set_root(self, name: str, generation_id: int) -> Branch:
        """Point a branch at its root generation (generation 0 of ``main`` is made after its branch)."""

    def set_settings(self, name: str, settings: Mapping[str, Any]) -> Branch:
        """Replace the branch's stored settings document (the caller has validated it)."""


class GenerationRepository(Protocol):
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

    def find(self, generation_id: int) -> Generation | None: ...

    def get(self, generation_id: int) -> Generation: ...

    def list(self, branch: str | None = None) -> builtins.list[Generation]: ...

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

    def set_status(self, generation_id: int, status: str) -> Generation: ...


class AliasRepository(Protocol):
    def set(self, branch: str, name: str, generation_id: int) -> Alias:
        """Point ``branch``'s alias ``name`` at a generation, atomically."""

    def get(self, branch: str, name: str) -> Alias | None: ...

    def list(self, branch: str | None = None) -> builtins.list[Alias]: ...

    def remove(self, branch: str, name: str) -> bool:
        """Drop an alias; True if there was one."""


class CycleRepository(Protocol):
    def create(self, branch: str, state: str, parent_generation_id: int | None = None) -> Cycle: ...

    def get(self, cycle_id: int) -> Cycle: ...

    def list(self, branch: str | None = None, unfinished_only: bool = False) -> builtins.list[Cycle]:
        """Cycles in id order; ``unfinished_only`` gives the ones to resume after a crash."""

    def set_state(self, cycle_id: int, state: str) -> Cycle: ...

    def set_generation(self, cycle_id: int, generation_id: int) -> Cycle: ...

    def finish(self, cycle_id: int, outcome: str, error: str | None = None, state: str | None = None) -> Cycle:
        """Mark a cycle finished now with its outcome (and error); ``state`` too, if given."""

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

    def finish_event(self, event_id: int, outcome: str, detail: dict[str, Any] | None = None) -> CycleEvent:
        """Close a step recorded as started: its outcome, now as its end, and (if given) new details."""

    def events(self, cycle_id: int) -> builtins.list[CycleEvent]: ...


class ReplayRepository(Protocol):
    def add_many(self, members: Sequence[ReplayMember]) -> int:
        """Put interactions in their branch's buffer; a member already there gets the new experience and priority."""

    def members(self, branch: str) -> list[ReplayMember]: ...

    def remove(self, branch: str, interaction_ids: Sequence[int]) -> int:
        """Evict members of ``branch``'s buffer; returns how many were there."""


class TokenRepository(Protocol):
    def create(self, name: str, scope: str) -> tuple[ApiToken, str]:
        """A new token: the record and the plaintext, which is shown once and never stored."""

    def verify(self, plaintext: str) -> ApiToken | None:
        """The live token whose secret this is, or None (unknown or revoked)."""

    def revoke(self, token_id: int) -> ApiToken:
        """Revoke a token (again is a no-op that keeps the first revocation time)."""

    def list(self) -> builtins.list[ApiToken]: ...


class UnitOfWork(Protocol):
    """The repositories of one transaction (``Store.transaction``). Read-only properties, so that an
    implementation may hold its own repository classes."""

    @property
    def interactions(self) -> InteractionRepository: ...

    @property
    def feedback(self) -> FeedbackRepository: ...

    @property
    def branches(self) -> BranchRepository: ...

    @property
    def generations(self) -> GenerationRepository: ...

    @property
    def aliases(self) -> AliasRepository: ...

    @property
    def cycles(self) -> CycleRepository: ...

    @property
    def replay(self) -> ReplayRepository: ...

    @property
    def tokens(self) -> TokenRepository: ...

