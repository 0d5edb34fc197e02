"""`selftune serve` under a fake $NOTIFY_SOCKET: READY=1 after readiness, WATCHDOG=1 pings, STOPPING=1 on
SIGTERM, and a clean exit within the stop timeout while a cycle is training."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import process_alive

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "python_docs.jsonl"
STOP_TIMEOUT = 20
WATCHDOG_SECONDS = 2
SLOW_TRAINING = {  # a cycle that is still training when SIGTERM comes
    "SELFTUNE_REPLAY__REHEARSAL": "0",  # the untrained tiny model ends no answer: no rehearsal row would be kept
    "SELFTUNE_TRAIN__STEPS": "5000", "SELFTUNE_TRAIN__BATCH_SIZE": "4", "SELFTUNE_TRAIN__MAX_LENGTH": "96",
    "SELFTUNE_TRAIN__THREADS": "1", "SELFTUNE_SERVER__STOP_TIMEOUT_SECONDS": str(STOP_TIMEOUT),
    "SELFTUNE_SCHEDULE__ENABLED": "false",
}


class NotifyListener:
    """The supervisor's end of $NOTIFY_SOCKET: every datagram, with the time it came."""

    def __init__(self, path: Path) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))
        self.socket.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append((time.monotonic(), self.socket.recv(65536).decode()))
            except TimeoutError:
                continue

    def wait_for(self, line: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, message in list(self.messages):
                if line in message.split("\n"):
                    return at
            time.sleep(0.05)
        raise AssertionError(f"no {line} within {timeout} s; got {[m for _, m in self.messages]}")

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [(at, line) for at, message in list(self.messages)
                for line in message.split("\n") if line.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.socket.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def test_notify_protocol_and_a_clean_stop_while_a_cycle_trains(
        make_state: Callable[..., Path], token_for: Callable[[Path, str], str],
        server_process: Callable[..., Any], listener: NotifyListener, tmp_path: Path) -> None:
    state = make_state()
    admin = {"Authorization": f"Bearer {token_for(state, 'admin')}"}
    server = server_process(state, env={**SLOW_TRAINING, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                        "WATCHDOG_USEC": str(WATCHDOG_SECONDS * 1_000_000)})
    server.start(wait_ready=False)

    ready_at = listener.wait_for("READY=1", timeout=120)
    assert httpx.get(f"{server.url}/readyz").status_code == 200  # READY=1 comes only once /readyz passes
    ready_status = [line for _, line in listener.lines("STATUS=") if "serving on" in line]
    assert ready_status and "champions main=0" in ready_status[0]

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    with httpx.Client(base_url=server.url, headers=admin, timeout=30) as client:
        assert client.post("/v1/interactions", json=rows).json()["accepted"] == len(rows)
        started = client.post("/v1/cycles", json={"branch": "main"})
        assert started.status_code == 202, started.text
        cycle_id = started.json()["cycle"]
        assert client.post("/v1/cycles", json={}).status_code == 409  # one at a time
        cycle_dir = state / "cycles" / str(cycle_id)
        progress = cycle_dir / "train" / "progress.jsonl"
        deadline = time.monotonic() + 180
        while not (progress.exists() and progress.read_text()):  # a training step has been taken
            assert time.monotonic() < deadline, client.get(f"/v1/cycles/{cycle_id}").text
            time.sleep(0.5)
        assert client.get(f"/v1/cycles/{cycle_id}").json()["status"] == "running"

    pings = [at for at, _ in listener.lines("WATCHDOG=1")]
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    late = [(round(a - ready_at, 1), round(b - a, 2)) for a, b in zip(pings, pings[1:], strict=False) if b - a > 1.2]
    print(f"{len(pings)} watchdog pings, gaps: median {sorted(gaps)[len(gaps) // 2]:.2f} s, max {max(gaps):.2f} s, "
          f"late (s after READY, gap): {late}")
    assert len(pings) >= 4 and max(gaps) < WATCHDOG_SECONDS  # every WatchdogSec/2, never as late as WatchdogSec

    pid_files = [cycle_dir / "worker.pid", cycle_dir / "training.pid"]  # the worker, and the trainer it started
    pids = [int(path.read_text()) for path in pid_files if path.exists()]
    assert len(pids) == 2 and all(process_alive(pid) for pid in pids), "the cycle must be training"
    signalled = time.monotonic()
    exit_code = server.terminate(timeout=STOP_TIMEOUT + 30)
    stopped_after = time.monotonic() - signalled
    assert exit_code == 0, server.log_text()
    assert stopped_after < STOP_TIMEOUT, f"took {stopped_after:.1f} s"
    assert listener.wait_for("STOPPING=1", timeout=1) - signalled < 1.0
    left = [pid for pid in pids if process_alive(pid)]
    for pid in left:  # do not leave a trainer running after a failed test
        os.kill(pid, signal.SIGKILL)
    assert not left, "the cycle's worker and its trainer must be gone when the service has stopped"
    checkpoint = json.loads((cycle_dir / "train" / "checkpoint" / "state.json").read_text())
    assert checkpoint["step"] >= 1  # the trainer saved the steps it had taken

    from selftune.daemon.context import Context

    with Context.open(str(state)).store.transaction() as tx:
        cycle = tx.cycles.get(cycle_id)
    assert cycle.outcome == "cancelled" and cycle.finished_at is not None
