"""The shared frozen records that repositories return and policies decide over."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
FeedbackKind = Literal["thumbs", "score", "correction", "preference"]
FEEDBACK_KINDS: tuple[str, ...] = ("thumbs", "score", "correction", "preference")
GenerationStatus = Literal["candidate", "promoted", "rejected", "failed"]
GENERATION_STATUSES: tuple[str, ...] = ("candidate", "promoted", "rejected", "failed")
CHAMPION = "champion"
"""The alias of the generation that serves a branch."""
CHALLENGER = "challenger"
"""The alias of a candidate that passed its gates and waits for approval."""
ALIASES: tuple[str, ...] = (CHAMPION, CHALLENGER)
FOUNDATION_ID = 0
"""Generation 0: the foundation, the root of every lineage."""
MAIN_BRANCH = "main"
"""The generalist line that ``init`` creates."""
AUTO_MODEL = "auto"
"""The model name that routes each request to the smallest generation that can answer it (no branch has it)."""
TokenScope = Literal["ingest", "admin"]
TOKEN_SCOPES: tuple[str, ...] = ("ingest", "admin")


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    weight: int | None = None
    """OpenAI fine-tuning's per-message weight: 0 on an assistant turn means "do not train on it"; None (the
    default, and what weight 1 is stored as) trains on it."""

    def as_dict(self) -> dict[str, Any]:
        """The message as stored and as learners read it: ``{"role", "content"}``, plus ``weight`` when set."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.weight is not None:
            out["weight"] = self.weight
        return out

    @classmethod
    def from_dict(cls, item: Mapping[str, Any]) -> Message:
        return cls(item["role"], item["content"], item.get("weight"))


@dataclass(frozen=True, slots=True)
class FeedbackIn:
    """Feedback on an interaction, before it is stored. Exactly the fields of its ``kind`` are set."""

    kind: str
    thumbs_up: bool | None = None
    score: float | None = None
    corrected_response: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    comment: str | None = None


@dataclass(frozen=True, slots=True)
class InteractionIn:
    """A validated interaction, before it is stored."""

    messages: tuple[Message, ...]
    branch: str = "main"
    domain: str | None = None
    tags: tuple[str, ...] = ()
    external_id: str | None = None
    source: str = "api"
    feedback: tuple[FeedbackIn, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    """Fields of the input row that selftune does not interpret, kept as they were."""
    content_hash: str = field(default="")

    def __post_init__(self) -> None:
        if not self.content_hash:
            object.__setattr__(self, "content_hash", content_hash(self.messages))

    @property
    def dedupe_key(self) -> str:
        """What makes a row the same row again: its external id, else its content."""
        return f"id:{self.external_id}" if self.external_id is not None else f"sha256:{self.content_hash}"


@dataclass(frozen=True, slots=True)
class Interaction:
    id: int
    branch: str
    messages: tuple[Message, ...]
    created_at: datetime
    source: str
    content_hash: str
    external_id: str | None = None
    domain: str | None = None
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The last user message before the final assistant turn."""
        users = [m.content for m in self.messages if m.role == "user"]
        return users[-1] if users else ""

    @property
    def response(self) -> str:
        """The final assistant turn ("" if the exchange has none)."""
        return self.messages[-1].content if self.messages and self.messages[-1].role == "assistant" else ""


@dataclass(frozen=True, slots=True)
class Feedback:
    id: int
    interaction_id: int
    kind: str
    created_at: datetime
    thumbs_up: bool | None = None
    score: float | None = None
    corrected_response: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    comment: str | None = None


@dataclass(frozen=True, slots=True)
class Generation:
    id: int
    branch: str
    status: str
    path: str
    checksum: str
    params: int
    created_at: datetime
    parent_id: int | None = None
    cycle_id: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Branch:
    name: str
    created_at: datetime
    root_generation_id: int | None = None
    domains: tuple[str, ...] = ()
    """Its scope: interactions of these domains are routed to it (a domain belongs to at most one branch)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Its own settings, ``"section.key" -> value``, as ``selftune branch set`` stored them
    (``policies.branches`` turns them into the branch's effective configuration)."""

    @property
    def is_specialist(self) -> bool:
        """A branch with a scope is a specialist: judged on its domains, and pruned by default."""
        return bool(self.domains)


@dataclass(frozen=True, slots=True)
class Alias:
    branch: str
    name: str
    generation_id: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Cycle:
    id: int
    branch: str
    state: str
    created_at: datetime
    parent_generation_id: int | None = None
    generation_id: int | None = None
    finished_at: datetime | None = None
    outcome: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class CycleEvent:
    id: int
    cycle_id: int
    step: str
    outcome: str
    started_at: datetime
    finished_at: datetime | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReplayMember:
    branch: str
    interaction_id: int
    experience: int
    priority: float = 0.0


@dataclass(frozen=True, slots=True)
class ApiToken:
    id: int
    name: str
    scope: str
    created_at: datetime
    revoked_at: datetime | None = None


MAX_CONFLICT_IDS = 20
"""Conflicting ids an ``IngestResult`` names (it counts them all)."""


@dataclass(frozen=True, slots=True)
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    feedback: int = 0
    """Feedback items stored on rows that were already there (a row re-ingested under its id with new feedback)."""
    conflicts: int = 0
    """Rows whose id is stored with other messages: not written, the stored row stays."""
    conflict_ids: tuple[str, ...] = ()
    """The first ``MAX_CONFLICT_IDS`` of those ids."""

    def __add__(self, other: IngestResult) -> IngestResult:
        return IngestResult(
            self.accepted + other.accepted, self.duplicates + other.duplicates, self.rejected + other.rejected,
            self.feedback + other.feedback, self.conflicts + other.conflicts,
            (self.conflict_ids + other.conflict_ids)[:MAX_CONFLICT_IDS],
        )


def content_hash(messages: tuple[Message, ...] | list[Message]) -> str:
    """A stable SHA-256 of the messages (role and content), the same across processes and databases.

    Each part is length-prefixed, so no two different conversations hash the same input.
    """
    digest = hashlib.sha256()
    for message in messages:
        content = message.content.encode("utf-8")
        digest.update(f"{message.role}\0{len(content)}\0".encode())
        digest.update(content)
        if message.weight is not None:  # an untrained turn is other training data (no text holds a NUL)
            digest.update(f"\0weight={message.weight}\0".encode())
    return digest.hexdigest()
