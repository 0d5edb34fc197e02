"""``selftune serve``: the API (uvicorn, one worker) and the scheduler in one process, one event loop.

Lifecycle, as systemd sees it (``deploy/selftune.service``, ``Type=notify``):

- start: migrate, resume a cycle whose worker died with the last service, start the scheduler,
  serve HTTP, load the default branch's champion; READY=1 once ``/readyz`` would pass.
- running: a housekeeping task on the event loop sends WATCHDOG=1 (so a hung loop stops the pings),
  STATUS= lines when something changes, and loads a newly promoted champion (and the routing index of a
  specialist's, with the router's embedder) ahead of requests.
- SIGHUP (``systemctl reload``): read the configuration again; schedule and server limits apply at
  once, the database URL and the listening address need a restart. An invalid file changes nothing.
- SIGTERM / SIGINT: STOPPING=1; stop intake (new writes get 503, the listener closes), cancel the
  running cycle (its training checkpoints) and shut the scheduler down, let in-flight requests end,
  all within ``server.stop_timeout_seconds`` (below the unit's TimeoutStopSec), then exit 0.

Logs go to stderr; under journald (``$JOURNAL_STREAM``) each line starts with its syslog priority
(``<3>`` error ... ``<7>`` debug), which journald turns into the entry's priority.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import anyio
import uvicorn

from selftune.policies.errors import ConfigError
from selftune.policies.records import Cycle

from selftune.daemon.context import Context
from selftune.daemon.cycle.control import cancel_cycle, resume_cycles, running_cycle, service_lock, worker_alive
from selftune.daemon.http.app import create_app
from selftune.daemon.http.routers.health import readiness
from selftune.daemon.http.state import ServiceState
from selftune.daemon.service.scheduler import CycleScheduler
from selftune.daemon.service.systemd import Notifier

log = logging.getLogger("selftune.serve")
HOUSEKEEPING_SECONDS = 1.0
SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``: journald reads the prefix and adds its own timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        text = super().format(record)
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())  # a traceback keeps its priority


def configure_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "alembic", "apscheduler.executors", "apscheduler.scheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the service handles SIGTERM, SIGINT and SIGHUP itself."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Service:
    def __init__(self, context: Context, host: str, port: int, notifier: Notifier | None = None) -> None:
        self.context = context
        self.host = host
        self.port = port
        self.notifier = notifier or Notifier()
        self.state = ServiceState.build(context)  # the metrics and champion pool, shared by API and scheduler
        self.app = create_app(context, state=self.state)
        self.scheduler = CycleScheduler(context, self.state.metrics)
        self.server: _Server | None = None
        self.stopping = False
        self.ready = False
        self._status = ""
        self._refreshing = False
        self._cancelling: asyncio.Task[int | None] | None = None

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._set_status("starting: resuming an interrupted cycle, if any")
        await anyio.to_thread.run_sync(self._resume_cycle)
        if self.stopping:  # stopped while starting
            return 0
        server_config = self.context.config.server
        self.server = _Server(uvicorn.Config(
            self.app, host=self.host, port=self.port, workers=1, log_config=None, access_log=False,
            server_header=False, timeout_graceful_shutdown=max(1, int(server_config.stop_timeout_seconds)),
            lifespan="on"))
        self.scheduler.start()
        tasks = [asyncio.create_task(self._watchdog()), asyncio.create_task(self._housekeeping())]
        try:
            await self.server.serve()
        finally:
            for task in tasks:
                task.cancel()
            self.scheduler.shutdown()
        if not self.stopping:  # uvicorn gave up by itself (e.g. the port is taken): a failure
            log.error("the HTTP server stopped on its own (see above); exiting")
            return 1
        await self._stop_cycle()
        log.info("stopped")
        self.notifier.close()
        return 0

    # -- signals -----------------------------------------------------------------------------------------

    def stop(self, signame: str = "SIGTERM") -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("%s: stopping (intake closed, cycle cancelled, scheduler shut down)", signame)
        self.notifier.stopping("stopping: finishing in-flight requests and checkpointing the cycle")
        self.state.accepting = False
        self.scheduler.shutdown()
        self._cancelling = asyncio.get_running_loop().create_task(anyio.to_thread.run_sync(self._cancel_cycle))
        if self.server is not None:
            self.server.should_exit = True

    def reload(self) -> None:
        """SIGHUP: read the configuration again; keep the old one if the new one is invalid."""
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            fresh = Context.open(str(self.context.state), str(self.context.config_file)).config
        except ConfigError as exc:
            log.error("SIGHUP: the configuration was not reloaded, the old one stays in force: %s", exc)
            self._after_reload(f"configuration NOT reloaded (invalid): {str(exc).splitlines()[0]}")
            return
        old = self.context.config
        if (fresh.storage, fresh.server.host, fresh.server.port) != (old.storage, old.server.host, old.server.port):
            log.warning("SIGHUP: [storage], server.host and server.port take effect at the next restart")
            fresh = replace(fresh, storage=old.storage)
        if not self.stopping:
            try:
                self.scheduler.configure(fresh.schedule)
            except ConfigError as exc:  # a crontab that only the scheduler can check
                log.error("SIGHUP: the configuration was not reloaded, the old one stays in force: %s", exc)
                self._after_reload(f"configuration NOT reloaded (invalid): {exc.problems[0]}")
                return
        self.context.config = fresh
        log.info("SIGHUP: configuration reloaded from %s", self.context.config_file)
        self._after_reload("configuration reloaded")

    def _after_reload(self, status: str) -> None:
        """End the reload for systemd: READY=1 again if the service was ready (else it still comes later)."""
        if self.ready and not self.stopping:
            self.notifier.ready(status)
        else:
            self.notifier.status(status)

    # -- the housekeeping loop (on the event loop: its pings prove the loop is alive) ----------------------

    async def _watchdog(self) -> None:
        """WATCHDOG=1 every WatchdogSec/2, from a task on the event loop: if the loop that serves requests
        hangs, the pings stop and systemd restarts the service."""
        interval = (self.notifier.watchdog_seconds or 0) / 2
        if not interval:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _housekeeping(self) -> None:
        last_refresh = 0.0
        while True:
            try:
                if not self.ready and not self.stopping and self.server is not None and self.server.started:
                    await self._announce_ready()
                if self.ready and time.monotonic() - last_refresh >= self.context.config.server.champion_poll_seconds:
                    last_refresh = time.monotonic()
                    self._refresh_champions()
                await self._update_status()
            except Exception:  # noqa: BLE001 - housekeeping must go on
                log.exception("housekeeping step failed")
            await asyncio.sleep(HOUSEKEEPING_SECONDS)

    async def _announce_ready(self) -> None:
        problems = await anyio.to_thread.run_sync(readiness, self.state)
        if problems:
            self._set_status("starting: " + "; ".join(problems))
            return
        self.ready = True
        self.state.metrics.ready.set(1)
        log.info("ready on http://%s:%s (champions: %s)", self.host, self.port, self.state.pool.loaded())
        self._status = self._describe()
        self.notifier.ready(self._status)

    def _refresh_champions(self) -> None:
        if self._refreshing:
            return
        self._refreshing = True

        async def refresh() -> None:
            try:
                await anyio.to_thread.run_sync(self.state.pool.refresh)
                if self.state.router is not None:  # re-read moved champions' routing indexes ahead of requests
                    await anyio.to_thread.run_sync(self.state.router.warm)
            except Exception:  # noqa: BLE001 - housekeeping must go on
                log.exception("refreshing the champions or the routing indexes failed")
            finally:
                self._refreshing = False

        asyncio.get_running_loop().create_task(refresh())

    async def _update_status(self) -> None:
        if not self.ready or self.stopping:
            return
        cycle = await anyio.to_thread.run_sync(self._running_cycle)
        self.state.metrics.cycle_running.set(1 if cycle else 0)
        self._set_status(self._describe(cycle))

    def _describe(self, cycle: Cycle | None = None) -> str:
        champions = ", ".join(f"{b}={g}" for b, g in sorted(self.state.pool.loaded().items())) or "none"
        running = f"; cycle {cycle.id} of {cycle.branch} at {cycle.state}" if cycle else "; no cycle running"
        return f"serving on {self.host}:{self.port}; champions {champions}{running}"

    def _set_status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self.notifier.status(text)

    # -- the cycle ----------------------------------------------------------------------------------------

    def _running_cycle(self) -> Cycle | None:
        return running_cycle(self.context)

    def _resume_cycle(self) -> None:
        resumed = resume_cycles(self.context)
        if resumed:
            log.info("resumed cycle(s) %s, interrupted with the last service", resumed)

    def _cancel_cycle(self) -> int | None:
        """Cancel the running cycle, if any; its id."""
        cycle = running_cycle(self.context)
        if cycle is None:
            return None
        log.info("cancelling cycle %s (its worker checkpoints and stops)", cycle.id)
        cancel_cycle(self.context, cycle.id)
        return cycle.id

    async def _stop_cycle(self) -> None:
        """Wait (bounded) until the cancelled cycle's worker has checkpointed and exited."""
        if self._cancelling is None:
            return
        cycle_id = await self._cancelling
        deadline = time.monotonic() + self.context.config.server.stop_timeout_seconds
        while cycle_id is not None and time.monotonic() < deadline:
            if not await anyio.to_thread.run_sync(worker_alive, self.context, cycle_id):
                return
            await asyncio.sleep(0.1)
        if cycle_id is not None:
            log.warning("cycle %s did not stop within server.stop_timeout_seconds; leaving it to systemd", cycle_id)


def run_service(context: Context, host: str, port: int) -> int:
    """Run the service in this process until it is stopped; the exit status."""
    configure_logging()
    _quiet_libraries()
    import torch  # here, not in a thread of the running loop: loading its libraries holds the GIL for long
    import transformers  # noqa: F401

    if context.config.model.threads:
        torch.set_num_threads(context.config.model.threads)
    with service_lock(context):  # a cycle's worker sees it and leaves a core for serving
        context.store  # noqa: B018 - migrate before anything listens, so a broken database fails the start
        return asyncio.run(Service(context, host, port).run())


def _quiet_libraries() -> None:
    from transformers.utils import logging as transformers_logging  # transformers: only the service loads it

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
