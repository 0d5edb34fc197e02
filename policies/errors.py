"""The error types. Each subclasses a built-in too, and its message names the bad value and the fix."""

from __future__ import annotations


class SelftuneError(Exception):
    """Base of every error selftune raises on purpose."""


class ConfigError(SelftuneError, ValueError):
    """The configuration is invalid; ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems: list[str], source: str = "configuration") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {source} ({len(self.problems)} problem(s)):\n{lines}")


class InvalidRecordError(SelftuneError, ValueError):
    """One input row (an interaction or a feedback) is malformed."""

    def __init__(self, message: str, line: int | None = None) -> None:
        self.line = line
        self.reason = message
        super().__init__(f"line {line}: {message}" if line is not None else message)


class IngestRejectedError(SelftuneError, ValueError):
    """A whole input was rejected because some rows are malformed; nothing of it was written."""

    def __init__(self, errors: list[InvalidRecordError], total_errors: int) -> None:
        self.errors = errors
        self.total_errors = total_errors
        shown = "\n".join(f"  - {e}" for e in errors)
        more = f"\n  ... and {total_errors - len(errors)} more" if total_errors > len(errors) else ""
        super().__init__(
            f"rejected: {total_errors} malformed row(s), nothing was written:\n{shown}{more}\n"
            "Fix those rows, or pass --skip-invalid to ingest the good rows and report the bad ones."
        )


class NotFoundError(SelftuneError, LookupError):
    """A generation, interaction, branch, alias, cycle or token does not exist."""


class ConflictError(SelftuneError, ValueError):
    """The request conflicts with the current state (a name taken, a status that forbids it)."""


class ArtifactError(SelftuneError, OSError):
    """A generation directory is missing, incomplete, or fails its checksums."""


class DatabaseUnavailableError(SelftuneError, OSError):
    """The database cannot take a write now; the transaction was rolled back, so nothing of it was kept.
    The message is one line naming the database (``storage.db`` raises the subclasses below)."""


class DatabaseBusyError(DatabaseUnavailableError):
    """Another writer held the lock longer than ``storage.busy_timeout_ms`` (or a statement ran past
    ``storage.statement_timeout_ms``): retrying shortly is the fix."""


class DatabaseFullError(DatabaseUnavailableError):
    """The database's disk (or its size limit) is full."""


class DatabaseReadOnlyError(DatabaseUnavailableError):
    """The database file (or its directory) is read-only to this process."""
