"""Fixtures of the service tests: an initialised state on the tiny model, tokens, a real `selftune serve`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

PG_URL = os.environ.get("SELFTUNE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

SELFTUNE = str(Path(sys.executable).with_name("selftune"))


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (a zombie counts: reap your children first)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_state(state: Path, foundation: Path, config: str = "") -> Path:
    """A state directory with generation 0 (the given model) as the champion of ``main``."""
    from selftune.daemon.context import Context
    from selftune.daemon.lineage import ensure_generation_zero

    state.mkdir(parents=True, exist_ok=True)
    if config:
        (state / "selftune.toml").write_text(config)
    context = Context.open(str(state))
    context.write_default_config()
    ensure_generation_zero(context, str(foundation))
    context.store.engine.dispose()
    return state


def create_token(state: Path, scope: str) -> str:
    from selftune.daemon.context import Context

    context = Context.open(str(state))
    with context.store.transaction(write=True) as tx:
        _, secret = tx.tokens.create(f"test-{scope}", scope)
    context.store.engine.dispose()
    return secret


def record_finished_cycle(context: Any, branch: str, outcome: str, gates: dict[str, bool] | None = None) -> int:
    """A finished cycle in the database, with its gate verdicts (name -> passed) in its work directory as the
    recipe's gate step writes them: what listings and metrics read, without training anything. Its id."""
    import json

    from selftune.daemon.cycle.workdir import GATE_RESULT, cycle_dir

    with context.store.transaction(write=True) as tx:
        cycle = tx.cycles.create(branch, "done", parent_generation_id=0)
        tx.cycles.finish(cycle.id, outcome, "the worker failed" if outcome == "failed" else None)
    if gates is not None:
        directory = cycle_dir(context, cycle.id)
        directory.mkdir(parents=True, exist_ok=True)
        verdicts = [{"name": name, "passed": passed, "value": 1.0, "threshold": 0.5, "margin": 0.5, "reason": ""}
                    for name, passed in gates.items()]
        (directory / GATE_RESULT).write_text(json.dumps({"action": outcome, "status": outcome, "reason": "",
                                                         "gates": verdicts}))
    return cycle.id


@pytest.fixture(scope="session")
def make_state(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Callable[..., Path]:
    """``make_state(config_toml="")``: a fresh, initialised state directory on the tiny model."""

    def make(config: str = "") -> Path:
        return init_state(tmp_path_factory.mktemp("state"), tiny_model_dir, config)

    return make


class ServerProcess:
    """`selftune serve` in a child process on a free port of 127.0.0.1 (real uvicorn, real signals)."""

    def __init__(self, state: Path, env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.state = state
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or state / f"serve-{self.port}.log"
        self.env = {**os.environ, "JOURNAL_STREAM": "", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 120) -> ServerProcess:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([SELFTUNE, "--state", str(self.state), "serve", "--port", str(self.port)],
                                            stdout=log, stderr=subprocess.STDOUT, env=self.env)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, f"serve exited:\n{self.log_text()}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"serve was not ready within {timeout} s:\n{self.log_text()}")

    def terminate(self, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""


@pytest.fixture
def server_process() -> Iterator[Callable[..., ServerProcess]]:
    """``server_process(state, env=None)``: an unstarted server; every one made is killed at teardown."""
    made: list[ServerProcess] = []

    def make(state: Path, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(state, env)
        made.append(server)
        return server

    yield make
    for server in made:
        server.kill()


@pytest.fixture(scope="session")
def token_for() -> Callable[[Path, str], str]:
    """``token_for(state, scope)``: a new API token's secret."""
    return create_token


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a new, empty schema on the PostgreSQL test server (dropped afterwards)."""
    import uuid

    from sqlalchemy import create_engine, make_url, text

    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    schema = f"selftune_daemon_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


# -- a real browser: Debian's Chromium driven by Playwright (no browser download), the network off ---------------

CHROMIUM_OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
"""No host name resolves (127.0.0.1 excepted): a page that needs the internet fails as it would offline."""
VIEWPORT = {"width": 1280, "height": 900}
BROWSER_ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
"""Where the browser tests save their screenshots (kept after the run, unlike pytest's tmp dirs)."""


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    """Debian's Chromium: installed with apt-get when missing (CI runs as root); a failure fails the tests."""
    import shutil

    if shutil.which("chromium") is None:
        environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        update = subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=environment)
        install = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium", "fonts-dejavu-core"],
                                 capture_output=True, text=True, env=environment)
        if install.returncode != 0:
            pytest.fail(f"cannot install Debian's chromium (the browser tests need it; run as root, or "
                        f"`apt-get install chromium`):\n{update.stderr[-2000:]}\n{install.stdout[-2000:]}\n{install.stderr[-2000:]}")
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not on PATH after installing it: install Debian's chromium package")
    return executable


class WatchedPage:
    """A Playwright page that records what went wrong (console errors and warnings, uncaught exceptions) and
    the URL of every request it made."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.problems: list[str] = []
        self.requests: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"exception: {error}"))
        page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} ({r.failure})"))
        page.on("request", lambda r: self.requests.append(r.url))

    def _console(self, message: Any) -> None:
        if message.type in ("error", "warning", "assert"):
            self.problems.append(f"console.{message.type}: {message.text} {message.location.get('url', '')}")

    def external_requests(self, *own: str) -> list[str]:
        """Requests to anywhere but ``own`` URL prefixes, files and data URIs."""
        return [u for u in self.requests if not u.startswith(("file:", "data:", *own))]


@pytest.fixture(scope="module")
def browser(chromium_executable: str) -> Iterator[Any]:
    """Headless Chromium for one test module (Playwright's sync API runs its own event loop: not for longer)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium_executable,
                                              args=["--no-sandbox", "--disable-gpu", CHROMIUM_OFFLINE])
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[[str], WatchedPage]]:
    """``open_page(url)``: a new page, watched, loaded at ``url``; closed at teardown."""
    pages: list[WatchedPage] = []

    def open_(url: str) -> WatchedPage:
        watched = WatchedPage(browser.new_page(viewport=VIEWPORT))
        pages.append(watched)
        watched.page.goto(url)
        return watched

    yield open_
    for watched in pages:
        watched.page.close()
