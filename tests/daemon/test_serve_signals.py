"""`selftune serve` and SIGHUP: the configuration is read again (an invalid one changes nothing); a taken port
fails the start. (SIGTERM: tests/daemon/test_systemd_notify.py.)"""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx


def job_ids(state: Path) -> set[str]:
    with sqlite3.connect(state / "selftune.db") as con:
        return {row[0] for row in con.execute("SELECT id FROM apscheduler_jobs")}


def wait_until(check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_sighup_reloads_the_configuration_and_keeps_the_old_one_if_invalid(
        make_state: Callable[..., Path], token_for: Callable[[Path, str], str],
        server_process: Callable[..., Any]) -> None:
    state = make_state()
    config = state / "selftune.toml"
    server = server_process(state).start()
    assert job_ids(state) == {"cycle-trigger-check"}

    config.write_text(config.read_text().replace("interval_minutes = 0", "interval_minutes = 45")
                      .replace("max_batch_rows = 1000", "max_batch_rows = 2"))
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: job_ids(state) == {"cycle-trigger-check", "cycle-interval"})
    headers = {"Authorization": f"Bearer {token_for(state, 'ingest')}"}
    three = [{"prompt": f"p{i}", "response": "r"} for i in range(3)]
    refused = httpx.post(f"{server.url}/v1/interactions", json=three, headers=headers)
    assert refused.status_code == 422 and "max_batch_rows = 2" in refused.text  # server limits apply at once

    config.write_text(config.read_text().replace("interval_minutes = 45", "interval_minutes = -1"))
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration was not reloaded" in server.log_text())
    assert "schedule.interval_minutes = -1" in server.log_text()  # the log names the bad setting
    assert httpx.get(f"{server.url}/readyz").status_code == 200  # still serving, on the old configuration
    assert job_ids(state) == {"cycle-trigger-check", "cycle-interval"}

    config.write_text(config.read_text().replace("interval_minutes = -1", "interval_minutes = 45"))
    second = server_process(state)  # a second service on the same port fails its start (systemd then says so)
    second.port, second.url = server.port, server.url
    second.start(wait_ready=False)
    assert second.process.wait(60) != 0 and "address already in use" in second.log_text().lower()
    assert server.terminate() == 0
