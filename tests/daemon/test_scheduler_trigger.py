"""End to end on a real `selftune serve`: enough new interactions start a cycle by themselves, and the
promoted generation answers the next chat request without a restart."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "python_docs.jsonl"
FAST_CYCLE = {  # as tests/daemon/test_cycle.py: small and quick; an untrained tiny model moves its loss ~1%
    "SELFTUNE_REPLAY__REHEARSAL": "0",  # the untrained tiny model ends no answer: no rehearsal row would be kept
    "SELFTUNE_TRAIN__STEPS": "12", "SELFTUNE_TRAIN__BATCH_SIZE": "4", "SELFTUNE_TRAIN__MAX_LENGTH": "96",
    "SELFTUNE_TRAIN__LEARNING_RATE": "0.02", "SELFTUNE_TRAIN__THREADS": "1", "SELFTUNE_CYCLE__MAX_EVAL_ROWS": "16",
    "SELFTUNE_CYCLE__SAMPLE_ANSWERS": "2", "SELFTUNE_EWC__FISHER_EXAMPLES": "8",
    "SELFTUNE_GATES__MIN_NEW_DATA_IMPROVEMENT": "0.002", "SELFTUNE_GATES__MIN_DECODE_SPEED_RATIO": "0.0",
}
TRIGGER = {"SELFTUNE_SCHEDULE__MIN_NEW_INTERACTIONS": "200", "SELFTUNE_SCHEDULE__CHECK_SECONDS": "1",
           "SELFTUNE_SERVER__CHAMPION_POLL_SECONDS": "3600"}  # no background reload: the request itself must see it
CHAT = {"model": "main", "messages": [{"role": "user", "content": "How do I open a file in Python?"}],
        "max_tokens": 12, "temperature": 0.8, "seed": 11}


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def test_new_interactions_start_a_cycle_and_its_champion_answers_without_restart(
        make_state: Callable[..., Path], token_for: Callable[[Path, str], str],
        server_process: Callable[..., Any]) -> None:
    state = make_state()
    admin = {"Authorization": f"Bearer {token_for(state, 'admin')}"}
    server = server_process(state, env={**FAST_CYCLE, **TRIGGER}).start()
    api = httpx.Client(base_url=server.url, headers=admin, timeout=60)
    before = api.post("/v1/chat/completions", json=CHAT).json()
    assert before["system_fingerprint"] == "generation-0"

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    assert api.post("/v1/interactions", json=rows[:150]).json()["accepted"] == 150
    time.sleep(3)  # three checks: 150 + 1 logged chat < 200, so no cycle yet
    assert api.get("/v1/cycles/1").status_code == 404
    assert api.post("/v1/interactions", json=rows[150:]).json()["accepted"] == len(rows) - 150

    cycle = wait_for(lambda: api.get("/v1/cycles/1").status_code == 200 and api.get("/v1/cycles/1").json(), 30,
                     "a cycle started by the trigger")
    created = next(step for step in cycle["steps"] if step["step"] == "created")
    assert created["detail"]["trigger"] == "200 new interactions"
    done = wait_for(lambda: (c := api.get("/v1/cycles/1").json())["status"] != "running" and c, 600, "the cycle")
    assert done["status"] == "promoted", done

    after = api.post("/v1/chat/completions", json=CHAT).json()  # the very next request, same process
    assert after["system_fingerprint"] == f"generation-{done['generation']}"
    assert after["choices"][0]["message"]["content"] != before["choices"][0]["message"]["content"]
    assert api.get("/readyz").json()["champions"] == {"main": done["generation"]}

    time.sleep(3)  # the interactions the cycle used are not new anymore: no second cycle
    assert api.get("/v1/cycles/2").status_code == 404
    assert 'selftune_cycles_started_total{branch="main",trigger="interactions"} 1.0' in api.get("/metrics").text
    assert server.terminate() == 0
