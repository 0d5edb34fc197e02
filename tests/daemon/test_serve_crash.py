"""kill -9 of `selftune serve` while clients stream POSTs: every acknowledged interaction survives, none twice."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROWS = 1200


def rows() -> list[dict[str, Any]]:
    """Half with an external id, half without (those are deduplicated by their content)."""
    return [{"prompt": f"crash question {i}", "response": f"answer {i}", **({"id": f"crash-{i}"} if i % 2 else {})}
            for i in range(ROWS)]


def post_until_refused(url: str, token: str, batch: list[dict[str, Any]], size: int, acked: set[int],
                       offset: int) -> None:
    """POST ``batch`` in slices of ``size`` (1 = single rows), noting the indexes of every 2xx, until the
    server goes away."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10) as client:
        for start in range(0, len(batch), size):
            part = batch[start:start + size]
            try:
                response = client.post("/v1/interactions", json=part[0] if size == 1 else part)
            except httpx.TransportError:
                return
            if response.is_success:
                acked.update(range(offset + start, offset + start + len(part)))


def stored(state: Path) -> dict[str, int]:
    """How many times each test row's prompt is stored."""
    with sqlite3.connect(state / "selftune.db") as con:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        found = con.execute("SELECT json_extract(messages, '$[0].content'), count(*) FROM interactions "
                            "WHERE json_extract(messages, '$[0].content') LIKE 'crash question %' GROUP BY 1")
        return dict(found)


def test_kill_9_while_clients_stream_posts_loses_and_doubles_nothing(
        make_state: Callable[..., Path], token_for: Callable[[Path, str], str],
        server_process: Callable[..., Any]) -> None:
    state = make_state("[schedule]\nenabled = false\n")
    token = token_for(state, "ingest")
    server = server_process(state).start()
    data = rows()
    acked: set[int] = set()
    # two clients at once: one sends single rows, the other batches of 25
    halves = [(data[: ROWS // 2], 1, 0), (data[ROWS // 2:], 25, ROWS // 2)]
    clients = [threading.Thread(target=post_until_refused, args=(server.url, token, part, size, acked, offset))
               for part, size, offset in halves]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 120
    while len(acked) < 300 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(server.process.pid, signal.SIGKILL)  # mid-stream: requests are in flight
    server.process.wait(30)
    for client in clients:
        client.join(30)
    assert 300 <= len(acked) < ROWS, "the kill must land while rows are still being sent"

    after_crash = stored(state)
    acknowledged = {data[i]["prompt"] for i in acked}
    assert acknowledged <= set(after_crash), "an acknowledged interaction was lost"
    assert set(after_crash.values()) == {1}

    # the clients retry everything they are unsure of (and, to be thorough, everything else too)
    restarted = server_process(state).start()
    for part, size, offset in halves:
        post_until_refused(restarted.url, token, part, size, set(), offset)
    final = stored(state)
    assert set(final) == {row["prompt"] for row in data} and set(final.values()) == {1}
    assert restarted.terminate() == 0
