"""The running instance's state directory, configuration, database and artifact store, opened lazily."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from selftune.policies.config import Config
from selftune.policies.errors import NotFoundError
from selftune.storage.artifacts import ArtifactStore
from selftune.storage.db import make_engine, migrate, sqlite_url
from selftune.storage.repositories import Store

from selftune.daemon.config import config_path, default_config_text, load_config, resolve_state_dir


@dataclass
class Context:
    state: Path
    config_file: Path
    config: Config

    @classmethod
    def open(cls, state: str | None = None, config: str | None = None) -> Context:
        """Resolve the state directory and load the configuration (an invalid one fails here, once)."""
        state_dir = resolve_state_dir(state)
        path = config_path(state_dir, config)
        return cls(state_dir, path, load_config(path))

    @property
    def database_url(self) -> str:
        return self.config.storage.database_url or sqlite_url(self.state / "selftune.db")

    def make_state_dir(self) -> None:
        """Create the state directory if it is missing: 0700, whatever the umask, because its database holds
        every logged conversation and the token hashes (systemd's StateDirectoryMode does the same)."""
        try:
            self.state.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            return
        self.state.chmod(0o700)

    @cached_property
    def store(self) -> Store:
        """The database, migrated to the newest schema."""
        self.make_state_dir()
        storage = self.config.storage
        engine = make_engine(self.database_url, busy_timeout_ms=storage.busy_timeout_ms,
                             statement_timeout_ms=storage.statement_timeout_ms)
        migrate(engine)
        return Store(engine)

    @cached_property
    def artifacts(self) -> ArtifactStore:
        self.make_state_dir()
        root = self.state / "generations"
        root.mkdir(exist_ok=True)
        return ArtifactStore(root)

    def write_default_config(self) -> bool:
        """Write the commented default configuration if there is no file yet; True if it wrote one."""
        if self.config_file.exists():
            return False
        if self.config_file.parent == self.state:
            self.make_state_dir()
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(default_config_text(), encoding="utf-8")
        return True

    def require_branch(self, name: str) -> None:
        """Fail, naming the branch and the fix, unless it exists."""
        with self.store.transaction() as tx:
            known = [b.name for b in tx.branches.list()]
        if name not in known:
            hint = "run `selftune init` first" if not known else (
                f"known branches: {', '.join(known)}; create it with `selftune branch create {name} --from GEN`")
            raise NotFoundError(f"no branch {name!r}: {hint}")
