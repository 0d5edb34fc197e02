"""The service's own answers in the cycle's selection, and feedback after the fact: re-ingested under the row's
id, from `selftune feedback`, through the API, capped per interaction. Real SQLite, the tiny model's state."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from selftune.policies.ingest import RowDefaults, parse_row
from selftune.policies.records import FeedbackIn
from selftune.storage.repositories.interactions import MAX_FEEDBACK_PER_INTERACTION

from selftune.daemon.cli.main import app
from selftune.daemon.context import Context
from selftune.daemon.cycle.workdir import SELECT_RESULT, Work, cycle_dir
from selftune.daemon.http.app import create_app
from selftune.daemon.http.routers.chat import _exchange_row
from selftune.daemon.http.schemas import ChatCompletionRequest
from selftune.daemon.reports.model import data_mix
from selftune.daemon.service.pool import Completion

from .conftest import SELFTUNE
from .test_api import assert_problem, wait_ready

UNRATED = "excluded: the service's own answer, no positive feedback"


@pytest.fixture(scope="module")
def state(make_state: Callable[..., Path]) -> Path:
    return make_state("[selection]\nnear_duplicate_similarity = 1.0\n")  # no embedding: the rows are distinct


@pytest.fixture(scope="module")
def context(state: Path) -> Iterator[Context]:
    context = Context.open(str(state))
    yield context
    context.store.engine.dispose()


def selftune(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SELFTUNE, "--state", str(state), *args], capture_output=True, text=True, timeout=120)


def select_step(context: Context) -> dict:
    """The cycle's select step, run as the worker runs it, on a new cycle of main; what it wrote."""
    from selftune.daemon.cycle import recipe

    with context.store.transaction(write=True) as tx:
        cycle = tx.cycles.create("main", "select", parent_generation_id=0)
        parent = tx.generations.get(0)
    recipe.select(Work(context, cycle, parent))
    return json.loads((cycle_dir(context, cycle.id) / SELECT_RESULT).read_text())


def selected_ids(result: dict) -> set[int]:
    return {row["id"] for row in (*result["train"], *result["held_out"])}


def test_a_cycle_trains_on_none_of_50_unrated_chat_exchanges_and_on_the_10_with_thumbs_up(context: Context) -> None:
    def exchange(i: int):  # stored exactly as /v1/chat/completions logs its exchanges
        messages = [{"role": "user", "content": f"chat question {i}: what is {i} squared?"}]
        request = ChatCompletionRequest(model="main", messages=messages)
        return _exchange_row(context, request, messages, f"chatcmpl-self{i:03d}",
                             Completion(f"{i} squared is {i * i}.", "stop", 9, 6, 0, 0.1))

    logged = [parse_row({"prompt": f"logged question {i}?", "response": f"logged answer {i}."},
                        defaults=RowDefaults(source="api")) for i in range(30)]
    with context.store.transaction(write=True) as tx:
        assert tx.interactions.add_batch([exchange(i) for i in range(50)] + logged).accepted == 80
        rows = tx.interactions.list(limit=1000)
    chats = {r.id for r in rows if r.external_id and r.external_id.startswith("chatcmpl-self")}
    assert len(chats) == 50

    unrated = select_step(context)
    assert selected_ids(unrated) & chats == set()
    assert selected_ids(unrated) == {r.id for r in rows} - chats  # the logged traffic trains as before
    assert unrated["counts"]["excluded_self_generated_unrated"] == 50
    assert {"key": "excluded_self_generated_unrated", "label": UNRATED, "rows": 50} in data_mix(unrated, {})["counts"]

    liked = sorted(chats)[::5]
    with context.store.transaction(write=True) as tx:
        for interaction_id in liked:
            tx.feedback.add(interaction_id, FeedbackIn("thumbs", thumbs_up=True))
    rated = select_step(context)
    assert len(liked) == 10 and selected_ids(rated) & chats == set(liked)
    assert rated["counts"]["excluded_self_generated_unrated"] == 40


def test_feedback_after_the_fact_by_reingesting_the_row_and_from_the_cli(state: Path, context: Context,
                                                                          tmp_path: Path) -> None:
    row = {"prompt": "What does len() return?", "response": "The number of items.", "id": "late-1"}
    with context.store.transaction(write=True) as tx:
        tx.interactions.add_batch([parse_row(row)])
        stored = tx.interactions.find_by_external_id("main", "late-1")
    assert stored is not None
    again = tmp_path / "again.jsonl"
    again.write_text(json.dumps({**row, "feedback": "up"}) + "\n"
                     + json.dumps({**row, "response": "An edited answer."}) + "\n")
    ingested = selftune(state, "ingest", str(again), "--json")
    assert ingested.returncode == 0, ingested.stderr
    assert json.loads(ingested.stdout) == {"accepted": 0, "duplicates": 1, "rejected": 0, "feedback": 1,
                                           "conflicts": 1}
    assert "1 row(s) reuse a stored id with other messages and were not written" in ingested.stderr
    assert "late-1" in ingested.stderr

    def feedback_command(*args: str):  # `selftune feedback`, in this process: the same typer app
        return CliRunner().invoke(app, ["--state", str(state), "feedback", *args])

    given = feedback_command(str(stored.id), "--thumbs", "down", "--score", "0.25",
                             "--correction", "The number of items in a container.", "--json")
    assert given.exit_code == 0, given.output
    assert [f["kind"] for f in json.loads(given.stdout)["feedback"]] == ["thumbs", "score", "correction"]
    refused = feedback_command(str(stored.id), "--thumbs", "maybe")
    assert refused.exit_code == 1 and "thumbs 'maybe' must be 'up', 'down'" in refused.output
    assert "no feedback given: use --thumbs up|down" in feedback_command(str(stored.id), "--comment", "hm").output
    with context.store.transaction() as tx:
        kept = tx.interactions.get(stored.id)
        feedback = [(f.kind, f.thumbs_up, f.score, f.corrected_response) for f in tx.feedback.for_interaction(stored.id)]
    assert kept.response == "The number of items."  # the content stays
    assert feedback == [("thumbs", True, None, None), ("thumbs", False, None, None), ("score", None, 0.25, None),
                        ("correction", None, None, "The number of items in a container.")]


def test_through_the_api_a_changed_row_is_a_conflict_and_feedback_stops_at_the_cap(
        state: Path, context: Context, token_for: Callable[[Path, str], str]) -> None:
    headers = {"Authorization": f"Bearer {token_for(state, 'ingest')}"}
    row = {"prompt": "Name a sorting algorithm.", "response": "Merge sort.", "id": "api-late-1"}
    with TestClient(create_app(context), raise_server_exceptions=False) as client:
        wait_ready(client)
        first = client.post("/v1/interactions", json=row, headers=headers).json()
        later = client.post("/v1/interactions", json={**row, "feedback": {"thumbs": "up"}}, headers=headers)
        assert later.status_code == 200 and later.json()["duplicates"] == 1 and later.json()["id"] == first["id"]
        changed = client.post("/v1/interactions", json=[{**row, "id": "api-late-2"}, {**row, "response": "Quicksort."}],
                              headers=headers)
        assert "1 row(s) reuse a stored id with other messages, nothing was written: 'api-late-1'" in assert_problem(
            changed, 409)["detail"]
        with context.store.transaction(write=True) as tx:
            for i in range(MAX_FEEDBACK_PER_INTERACTION - 1):
                tx.feedback.add(first["id"], FeedbackIn("score", score=float(i)))
            assert tx.interactions.find_by_external_id("main", "api-late-2") is None  # the 409 wrote nothing
        over = client.post(f"/v1/interactions/{first['id']}/feedback", json="down", headers=headers)
        detail = assert_problem(over, 409)["detail"]
        assert f"interaction {first['id']} has 100 feedback item(s)" in detail and "cap of 100 per interaction" in detail
    with context.store.transaction() as tx:
        assert len(tx.feedback.for_interaction(first["id"])) == MAX_FEEDBACK_PER_INTERACTION
