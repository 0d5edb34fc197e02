"""When cycles start by themselves: APScheduler 3 in the service's event loop, jobs kept in the database.

Jobs (explicit ids, ``replace_existing``, coalescing, one instance at a time, a generous misfire
grace time; all in UTC), from ``[schedule]``:

- ``cycle-cron``: on the crontab ``schedule.cron``, every branch with a champion becomes due;
- ``cycle-interval``: every ``schedule.interval_minutes``, the same;
- ``cycle-trigger-check``: every ``schedule.check_seconds``, start the next cycle if none is running:
  a due branch first, else a branch with ``schedule.min_new_interactions`` interactions that are
  newer than its last cycle (of any outcome, so a failing cycle is not retried in a loop) and
  newer than its champion's data cutoff.

Cycles run one at a time, in their own worker process (``cycle.start_cycle``), so a job only
starts one and returns. Automatic cycles are on by default: ``serve`` right after an ingest of
``min_new_interactions`` rows trains within ``check_seconds``; so the scheduler's start and every cycle it
starts are logged as warnings that say how to turn them off (``OFF_SWITCH``). Job targets are module-level
functions with primitive arguments (the job store pickles a reference to them); they act on the
service's ``CycleScheduler``, registered here when it starts. A job that fails is logged and counted, and
the scheduler goes on.

APScheduler 3 must not share its job store between processes: run the scheduler in one service
per database (see DESIGN.md, "When one machine is not enough").
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from selftune.policies.config import ScheduleConfig
from selftune.policies.errors import SelftuneError
from selftune.policies.records import CHAMPION, Cycle

from selftune.daemon.config import cron_trigger
from selftune.daemon.context import Context
from selftune.daemon.cycle.control import running_cycle, start_cycle
from selftune.daemon.service.metrics import Metrics

log = logging.getLogger(__name__)
JOB_TABLE = "apscheduler_jobs"
CRON_JOB = "cycle-cron"
INTERVAL_JOB = "cycle-interval"
CHECK_JOB = "cycle-trigger-check"
JOB_IDS = (CRON_JOB, INTERVAL_JOB, CHECK_JOB)

OFF_SWITCH = ("to turn automatic cycles off, set enabled = false under [schedule] in {config_file} (or "
              "SELFTUNE_SCHEDULE__ENABLED=false) and reload (SIGHUP, `systemctl reload selftune`) or restart")

_active: CycleScheduler | None = None
"""The running service's scheduler: what the module-level job targets act on."""


# -- job targets: stable module-level functions with primitive arguments --------------------------------


def run_scheduled(trigger: str) -> None:
    """A cron or interval fire: every branch becomes due, then the next cycle starts if none runs."""
    scheduler = _require_active()
    scheduler.mark_all_due(trigger)
    scheduler.check()


def run_trigger_check() -> None:
    """The periodic check: start the next due cycle (scheduled, or N new interactions) if none runs."""
    _require_active().check()


def _require_active() -> CycleScheduler:
    if _active is None:
        raise RuntimeError("a selftune scheduler job ran outside a running service: start it with `selftune serve`")
    return _active


# -- the decision, on data ---------------------------------------------------------------------------------


def new_interactions_due(context: Context, branch: str, minimum: int) -> bool:
    """Has ``branch`` at least ``minimum`` interactions newer than its last cycle and its champion's cutoff?

    A capped count: it reads no more than the branch's ``minimum`` newest rows, however many there are.
    """
    if minimum < 1:
        return False
    with context.store.transaction() as tx:
        cycles = tx.cycles.list(branch=branch)
        champion = tx.aliases.get(branch, CHAMPION)
        if champion is None:
            return False
        cutoff = int(tx.generations.get(champion.generation_id).metrics.get("cutoff", {}).get(branch, 0))
        last_cycle = cycles[-1].created_at if cycles else None
        new = tx.interactions.count_after(branch, cutoff, created_after=last_cycle, at_most=minimum)
    return new >= minimum


class CycleScheduler:
    """The service's APScheduler, its jobs, and the queue of branches due for a cycle."""

    def __init__(self, context: Context, metrics: Metrics | None = None) -> None:
        self.context = context
        self.metrics = metrics
        self.due: OrderedDict[str, str] = OrderedDict()
        """Branch -> what made it due, in the order they became due (scheduled fires waiting their turn)."""
        self._lock = threading.Lock()
        self._shut_down = False
        self.scheduler = AsyncIOScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=context.store.writer_engine(), tablename=JOB_TABLE)},
            job_defaults=self._job_defaults(context.config.schedule), timezone=UTC)
        self.scheduler.add_listener(self._on_job_event, _JOB_EVENTS)

    @staticmethod
    def _job_defaults(config: ScheduleConfig) -> dict[str, Any]:
        return {"coalesce": True, "max_instances": 1, "misfire_grace_time": config.misfire_grace_seconds}

    def start(self) -> None:
        """Register the jobs and start (call from inside the running event loop)."""
        global _active
        _active = self
        self.scheduler.start(paused=True)  # jobs stored by an earlier configuration must not fire before
        self.configure(self.context.config.schedule)  # this one has replaced or removed them
        self.scheduler.resume()
        schedule = self.context.config.schedule
        if schedule.enabled:
            when = [f"a branch has {schedule.min_new_interactions} new interactions (checked every "
                    f"{schedule.check_seconds} s)" if schedule.min_new_interactions else "",
                    f"on the crontab {schedule.cron!r} (UTC)" if schedule.cron else "",
                    f"every {schedule.interval_minutes} minutes" if schedule.interval_minutes else ""]
            log.warning("automatic cycles are ON: a cycle trains the model, in a worker process using the CPUs for "
                        "minutes, when %s; %s", " or ".join(w for w in when if w) or "a scheduled fire is due",
                        self._off_switch())

    def shutdown(self) -> None:
        """Stop firing jobs now; a check that is running finishes in its thread (it only starts a process).
        Idempotent: AsyncIOScheduler only marks itself stopped later, on the event loop."""
        global _active
        if self.scheduler.running and not self._shut_down:
            self._shut_down = True
            self.scheduler.shutdown(wait=False)
        if _active is self:
            _active = None

    def configure(self, config: ScheduleConfig) -> list[str]:
        """Make the stored jobs match ``config`` (also after a reload); returns the job ids in force."""
        wanted: dict[str, tuple[Any, Any, tuple[Any, ...]]] = {}
        if config.enabled and config.cron:
            wanted[CRON_JOB] = (run_scheduled, cron_trigger(config.cron), ("cron",))
        if config.enabled and config.interval_minutes:
            wanted[INTERVAL_JOB] = (run_scheduled, IntervalTrigger(minutes=config.interval_minutes, timezone=UTC),
                                    ("interval",))
        if config.enabled:
            wanted[CHECK_JOB] = (run_trigger_check, IntervalTrigger(seconds=config.check_seconds, timezone=UTC), ())
        defaults = self._job_defaults(config)
        for job_id, (func, trigger, args) in wanted.items():
            existing = self.scheduler.get_job(job_id)
            if existing is not None and str(existing.trigger) == str(trigger) and existing.args == args \
                    and existing.misfire_grace_time == defaults["misfire_grace_time"]:
                continue  # unchanged: keep its next run time (a restart must not postpone a due fire)
            self.scheduler.add_job(func, trigger, args=args, id=job_id, name=job_id, replace_existing=True,
                                   **defaults)
        for job_id in JOB_IDS:
            if job_id not in wanted:
                with suppress(JobLookupError):  # not stored: nothing to remove
                    self.scheduler.remove_job(job_id)
        log.info("scheduler jobs: %s", ", ".join(sorted(wanted)) or "none (schedule.enabled = false)")
        return sorted(wanted)

    def mark_all_due(self, trigger: str) -> None:
        with self._lock:
            for branch in self._branches_with_champion():
                self.due.setdefault(branch, trigger)

    def check(self) -> Cycle | None:
        """Start the next cycle if none is running: a due branch first, else one with enough new data."""
        with self._lock:
            if running_cycle(self.context) is not None:
                return None
            choice = self._next_branch()
            if choice is None:
                return None
            branch, trigger = choice
            self.due.pop(branch, None)
            return self._start(branch, trigger)

    def _next_branch(self) -> tuple[str, str] | None:
        if self.due:
            return next(iter(self.due.items()))
        minimum = self.context.config.schedule.min_new_interactions
        for branch in self._branches_with_champion():
            if new_interactions_due(self.context, branch, minimum):
                return branch, f"{minimum} new interactions"
        return None

    def _start(self, branch: str, trigger: str) -> Cycle | None:
        try:
            cycle = start_cycle(self.context, branch, trigger)
        except SelftuneError as exc:  # e.g. a cycle started by the CLI in between, or the branch is gone
            log.warning("no cycle started on branch %s (%s): %s", branch, trigger, exc)
            return None
        log.warning("AUTOMATIC CYCLE %s started on branch %s (trigger: %s): training the model now, in a worker "
                    "process; %s", cycle.id, branch, trigger, self._off_switch())
        if self.metrics is not None:
            self.metrics.cycles_started.labels(branch, trigger.split()[-1]).inc()
        return cycle

    def _off_switch(self) -> str:
        return OFF_SWITCH.format(config_file=self.context.config_file)

    def _branches_with_champion(self) -> list[str]:
        with self.context.store.transaction() as tx:
            return sorted({a.branch for a in tx.aliases.list() if a.name == CHAMPION})

    def _on_job_event(self, event: Any) -> None:
        outcome = "error" if getattr(event, "exception", None) else "missed" if event.code == _MISSED else "ok"
        if outcome == "error":
            log.error("scheduler job %s failed: %s", event.job_id, event.exception)
        if self.metrics is not None:
            self.metrics.scheduler_runs.labels(event.job_id, outcome).inc()

    def next_runs(self) -> dict[str, datetime | None]:
        return {job.id: job.next_run_time for job in self.scheduler.get_jobs()}


def _events() -> tuple[int, int]:
    from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED

    return EVENT_JOB_EXECUTED | EVENT_JOB_ERROR | EVENT_JOB_MISSED, EVENT_JOB_MISSED


_JOB_EVENTS, _MISSED = _events()
