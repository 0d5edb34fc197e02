"""The scheduler: jobs persisted in the database with their options, reconfiguration, the N-new trigger."""

from __future__ import annotations

import asyncio
import pickle
import sqlite3
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from selftune.daemon.context import Context
from selftune.daemon.service.scheduler import CHECK_JOB, CRON_JOB, INTERVAL_JOB, CycleScheduler, new_interactions_due
from selftune.policies.config import ScheduleConfig
from selftune.policies.errors import ConfigError
from selftune.policies.records import InteractionIn, Message


def with_schedule(context: Context, **changes: Any) -> Context:
    schedule = replace(context.config.schedule, **changes)
    return Context(context.state, context.config_file, replace(context.config, schedule=schedule))


def run_scheduler(context: Context, *then: ScheduleConfig) -> dict[str, Any]:
    """Start a scheduler on ``context`` in an event loop, reconfigure it with each of ``then``, shut it down;
    the next run times it reported before shutting down."""

    async def main() -> dict[str, Any]:
        scheduler = CycleScheduler(context)
        scheduler.start()
        for config in then:
            scheduler.configure(config)
        runs = scheduler.next_runs()
        scheduler.shutdown()
        await asyncio.sleep(0)  # AsyncIOScheduler shuts down on the loop
        return runs

    return asyncio.run(main())


def stored_jobs(state: Path) -> dict[str, Any]:
    with sqlite3.connect(state / "selftune.db") as con:
        rows = con.execute("SELECT id, job_state FROM apscheduler_jobs")
        return {job_id: pickle.loads(blob) for job_id, blob in rows}


def add_interactions(context: Context, count: int, tag: str) -> None:
    rows = [InteractionIn((Message("user", f"{tag} {i}"), Message("assistant", "ok")), branch="main")
            for i in range(count)]
    with context.store.transaction(write=True) as tx:
        tx.interactions.add_batch(rows)


def test_jobs_are_stored_in_the_database_with_explicit_ids_and_options(make_state: Callable[..., Path]) -> None:
    state = make_state()
    context = with_schedule(Context.open(str(state)), cron="0 3 * * *", interval_minutes=30, check_seconds=7,
                            misfire_grace_seconds=900)
    run_scheduler(context)
    jobs = stored_jobs(state)
    assert set(jobs) == {CRON_JOB, INTERVAL_JOB, CHECK_JOB}
    for job_id, job in jobs.items():
        assert job["id"] == job_id and job["coalesce"] is True and job["max_instances"] == 1
        assert job["misfire_grace_time"] == 900
        assert str(job["trigger"].timezone) == "UTC"
        assert all(isinstance(arg, str | int) for arg in job["args"])  # primitive arguments only
    assert jobs[CRON_JOB]["func"] == "selftune.daemon.service.scheduler:run_scheduled" and jobs[CRON_JOB]["args"] == ("cron",)
    assert jobs[INTERVAL_JOB]["args"] == ("interval",)
    assert jobs[CHECK_JOB]["func"] == "selftune.daemon.service.scheduler:run_trigger_check"
    assert str(jobs[CRON_JOB]["trigger"]) == "cron[month='*', day='*', day_of_week='*', hour='3', minute='0']"
    assert jobs[CHECK_JOB]["trigger"].interval.total_seconds() == 7


def test_a_restart_keeps_due_times_and_a_new_config_replaces_or_removes_jobs(make_state: Callable[..., Path]) -> None:
    state = make_state()
    context = with_schedule(Context.open(str(state)), cron="0 3 * * *", interval_minutes=30)
    first = run_scheduler(context)
    time.sleep(0.05)
    again = run_scheduler(context)  # a restart with the same configuration
    assert again == first, "an unchanged job must keep its next run time"
    changed = run_scheduler(context, replace(context.config.schedule, cron="", interval_minutes=10))
    assert set(stored_jobs(state)) == {INTERVAL_JOB, CHECK_JOB}
    assert changed[INTERVAL_JOB] != first[INTERVAL_JOB]
    run_scheduler(context, replace(context.config.schedule, enabled=False))
    assert stored_jobs(state) == {}


def test_new_interactions_since_the_last_cycle_and_the_champion_cutoff(make_state: Callable[..., Path]) -> None:
    context = Context.open(str(make_state()))
    add_interactions(context, 4, "first")
    assert not new_interactions_due(context, "main", 5)
    add_interactions(context, 1, "fifth")
    assert new_interactions_due(context, "main", 5)
    assert not new_interactions_due(context, "main", 0)  # 0 switches the trigger off
    assert not new_interactions_due(context, "nope", 1)  # a branch without a champion never triggers
    with context.store.transaction(write=True) as tx:  # a cycle ran (whatever its outcome): its data is not new anymore
        cycle = tx.cycles.create("main", "select", parent_generation_id=0)
        tx.cycles.finish(cycle.id, "rejected")
    assert not new_interactions_due(context, "main", 1)
    add_interactions(context, 5, "after the cycle")
    assert new_interactions_due(context, "main", 5) and not new_interactions_due(context, "main", 6)
    with context.store.transaction(write=True) as tx:  # the champion has learned from everything up to the newest row
        newest = tx.interactions.max_id("main")
        tx.generations.update(0, metrics={"cutoff": {"main": newest}})
    assert not new_interactions_due(context, "main", 1)


def test_check_starts_a_due_branch_once_and_never_two_cycles(make_state: Callable[..., Path]) -> None:
    from selftune.daemon.cycle.control import running_cycle, worker_alive

    context = with_schedule(Context.open(str(make_state())), min_new_interactions=0)
    scheduler = CycleScheduler(context)
    assert scheduler.check() is None  # nothing due, no data
    scheduler.mark_all_due("cron")
    assert list(scheduler.due) == ["main"]
    started = scheduler.check()
    assert started is not None and started.branch == "main" and not scheduler.due
    try:
        scheduler.mark_all_due("interval")
        assert scheduler.check() is None  # one cycle at a time: main stays due until this one ends
        assert list(scheduler.due) == ["main"]
        with context.store.transaction() as tx:
            created = [e for e in tx.cycles.events(started.id) if e.step == "created"]
        assert created[0].detail["trigger"] == "cron"
    finally:
        deadline = time.monotonic() + 120  # no data: the worker skips the cycle at select
        while running_cycle(context) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        while worker_alive(context, started.id) and time.monotonic() < deadline:
            time.sleep(0.2)
    with context.store.transaction() as tx:
        assert tx.cycles.get(started.id).outcome == "skipped"


def test_an_invalid_crontab_is_a_config_error_naming_the_setting(make_state: Callable[..., Path]) -> None:
    context = Context.open(str(make_state()))
    with pytest.raises(ConfigError, match=r"schedule.cron = '61 \* \* \* \*'"):
        CycleScheduler(context).configure(replace(context.config.schedule, cron="61 * * * *"))


@pytest.mark.postgres
def test_jobs_and_the_trigger_on_postgresql(make_state: Callable[..., Path], pg_url: str) -> None:
    from sqlalchemy import text

    context = with_schedule(Context.open(str(make_state(f'[storage]\ndatabase_url = "{pg_url}"\n'))),
                            cron="0 3 * * *")
    run_scheduler(context)
    with context.store.engine.connect() as connection:
        stored = {row[0] for row in connection.execute(text("SELECT id FROM apscheduler_jobs"))}
    assert stored == {CRON_JOB, CHECK_JOB}
    add_interactions(context, 3, "pg")
    assert new_interactions_due(context, "main", 3) and not new_interactions_due(context, "main", 4)
    context.store.engine.dispose()


def test_automatic_cycles_are_announced_loudly_with_how_to_turn_them_off(
        make_state: Callable[..., Path], caplog: pytest.LogCaptureFixture) -> None:
    """`serve` right after an ingest trains within check_seconds: its scheduler and each cycle it starts say so
    as warnings, with the off switch. Off, it says nothing of the kind."""
    from selftune.daemon.cycle.control import cancel_cycle, worker_alive

    context = with_schedule(Context.open(str(make_state())), min_new_interactions=3, check_seconds=30)
    add_interactions(context, 3, "first start")
    off_switch = f"set enabled = false under [schedule] in {context.config_file} (or SELFTUNE_SCHEDULE__ENABLED=false)"
    with caplog.at_level("WARNING", logger="selftune.daemon.service.scheduler"):
        run_scheduler(context)
        started = CycleScheduler(context).check()
    assert started is not None
    try:
        announced, cycle = (r.getMessage() for r in caplog.records)
        assert announced.startswith("automatic cycles are ON: a cycle trains the model") and off_switch in announced
        assert "when a branch has 3 new interactions (checked every 30 s)" in announced
        assert cycle.startswith(f"AUTOMATIC CYCLE {started.id} started on branch main (trigger: 3 new interactions)")
        assert off_switch in cycle
    finally:
        cancel_cycle(context, started.id)
        deadline = time.monotonic() + 120
        while worker_alive(context, started.id) and time.monotonic() < deadline:
            time.sleep(0.2)
    caplog.clear()
    with caplog.at_level("WARNING", logger="selftune.daemon.service.scheduler"):
        run_scheduler(with_schedule(context, enabled=False))
    assert caplog.records == []
