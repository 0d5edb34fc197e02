"""/metrics of the real app (SQLite, the tiny model): cycle outcomes and gate failures from the database, the
chat completion's duration under a name no one reads as a model generation, the champion as an info metric."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from selftune.daemon.context import Context
from selftune.daemon.http.app import create_app

from .conftest import record_finished_cycle


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition as (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_cycle_outcomes_and_gate_failures_and_name_the_champion(
        make_state: Callable[..., Path], token_for: Callable[[Path, str], str]) -> None:
    state = make_state()
    context = Context.open(str(state))
    record_finished_cycle(context, "main", "promoted", {"new_data_improvement": True, "params_ratio": True})
    record_finished_cycle(context, "main", "rejected", {"new_data_improvement": True, "params_ratio": False,
                                                        "experience_regression[python]": False})
    admin = {"Authorization": f"Bearer {token_for(state, 'admin')}"}
    with TestClient(create_app(context), headers=admin, raise_server_exceptions=False) as client:
        for _ in range(300):  # the champion loads in the background
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        chat = client.post("/v1/chat/completions", json={"model": "main", "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "Hi"}]})
        assert chat.status_code == 200, chat.text
        before = samples(client.get("/metrics").text)
        record_finished_cycle(context, "main", "rejected", {"params_ratio": False})  # e.g. by the CLI meanwhile
        after = samples(client.get("/metrics").text)
    context.store.engine.dispose()

    assert before[("selftune_cycles_total", (("branch", "main"), ("outcome", "promoted")))] == 1
    assert before[("selftune_cycles_total", (("branch", "main"), ("outcome", "rejected")))] == 1
    assert before[("selftune_gate_failures_total", (("gate", "params_ratio"),))] == 1
    assert before[("selftune_gate_failures_total", (("gate", "experience_regression"),))] == 1
    assert ("selftune_gate_failures_total", (("gate", "new_data_improvement"),)) not in before  # it passed
    assert after[("selftune_cycles_total", (("branch", "main"), ("outcome", "rejected")))] == 2
    assert after[("selftune_gate_failures_total", (("gate", "params_ratio"),))] == 2

    assert before[("selftune_completion_duration_seconds_count", (("branch", "main"),))] == 1
    assert before[("selftune_champion_info", (("branch", "main"), ("generation", "0")))] == 1
    names = {name for name, _ in before}
    assert not {n for n in names if n.startswith("selftune_generation_")}, "a name that reads as a model generation's"
    assert "selftune_champion_generation_id" not in names  # an id is a label of the info metric, not a value
