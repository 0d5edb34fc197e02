"""The API's answers when something breaks: a 500 keeps the keep-alive connection usable, a locked database
is a 503 with Retry-After (checked before a chat answer is generated), a full one a 507, and nothing of a
refused request is stored."""

from __future__ import annotations

import http.client
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, event

from selftune.daemon.context import Context
from selftune.daemon.http.app import create_app
from selftune.daemon.http.state import service_state
from .conftest import free_port
from .test_api import CHAT, ROW, assert_problem, count

BUSY = "[storage]\nbusy_timeout_ms = 200\n"


def bare_state(state: Path, config: str = "") -> tuple[Context, dict[str, str]]:
    """A state with branch main and an admin token, without a model: enough to ingest and list."""
    state.mkdir()
    (state / "selftune.toml").write_text(config)
    context = Context.open(str(state))
    with context.store.transaction(write=True) as tx:
        tx.branches.create("main")
        _, secret = tx.tokens.create("test", "admin")
    return context, {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def serve() -> Iterator[Callable[[Context], int]]:
    """``serve(context)``: the API under a real uvicorn (in a thread) on a free port of 127.0.0.1; the port."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(context: Context) -> int:
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(context, preload=False), host="127.0.0.1", port=port,
                                               log_config=None, access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        return port

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def test_after_a_500_the_same_keep_alive_connection_answers_the_next_request(
        tmp_path: Path, serve: Callable[[Context], int]) -> None:
    context, headers = bare_state(tmp_path / "state")
    with sqlite3.connect(tmp_path / "state" / "selftune.db") as con:  # every token check now fails: a 500
        con.execute("ALTER TABLE api_tokens RENAME TO api_tokens_gone")
    port = serve(context)
    # http.client keeps one connection and reconnects only when told to (Connection: close), so a server
    # that drops the connection after a 500 fails the next request every time, not just when it races.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    for _ in range(5):
        connection.request("POST", "/v1/interactions", json.dumps(ROW), {**headers, "Content-Type": "application/json"})
        failed = connection.getresponse()
        body = json.loads(failed.read())
        assert failed.status == 500 and failed.getheader("content-type") == "application/problem+json"
        assert "incident" in body["detail"] and "api_tokens" not in json.dumps(body)
        connection.request("GET", "/livez")
        next_one = connection.getresponse()
        assert (next_one.status, json.loads(next_one.read())) == (200, {"status": "ok"})
    connection.close()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:  # as the openai client
        for _ in range(5):
            assert client.post("/v1/interactions", json=ROW).status_code == 500
            assert client.get("/livez").status_code == 200


def test_a_write_while_another_holds_the_lock_is_503_with_retry_after_and_stores_nothing(tmp_path: Path) -> None:
    context, headers = bare_state(tmp_path / "state", BUSY)
    holder = sqlite3.connect(tmp_path / "state" / "selftune.db", isolation_level=None)
    with TestClient(create_app(context, preload=False)) as client:
        holder.execute("BEGIN IMMEDIATE")  # e.g. a long `selftune ingest` in another process
        try:
            started = time.monotonic()
            refused = client.post("/v1/interactions", json=ROW, headers=headers)
            waited = time.monotonic() - started
            body = assert_problem(refused, 503)
            assert refused.headers["retry-after"] == "5" and "retry shortly" in body["detail"]
            assert 0.2 <= waited < 5  # storage.busy_timeout_ms, not the default 30 s
            assert client.get("/v1/interactions", headers=headers).json()["data"] == []  # reads go on
        finally:
            holder.execute("ROLLBACK")
        assert client.post("/v1/interactions", json=ROW, headers=headers).json()["accepted"] == 1
    holder.close()
    assert count(tmp_path / "state") == 1
    context.store.engine.dispose()


def test_a_chat_request_on_a_locked_database_is_503_before_any_answer_is_generated(
        make_state: Callable[..., Path], token_for: Callable[[Path, str], str]) -> None:
    state = make_state(BUSY)
    headers = {"Authorization": f"Bearer {token_for(state, 'ingest')}"}
    context = Context.open(str(state))
    app = create_app(context, preload=False)
    holder = sqlite3.connect(state / "selftune.db", isolation_level=None)
    with TestClient(app) as client:
        holder.execute("BEGIN IMMEDIATE")
        try:
            refused = client.post("/v1/chat/completions", json=CHAT, headers=headers)
        finally:
            holder.execute("ROLLBACK")
        assert_problem(refused, 503)
        assert refused.headers["retry-after"] == "5"
        assert service_state(app).pool.loaded() == {}  # no model was even loaded: no answer was lost
        answered = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4}, headers=headers)
        assert answered.status_code == 200 and service_state(app).pool.loaded() == {"main": 0}
    holder.close()
    assert count(state) == 1  # the one answered exchange
    context.store.engine.dispose()


def test_a_write_to_a_full_database_is_507_and_stores_nothing_while_reads_go_on(tmp_path: Path) -> None:
    context, headers = bare_state(tmp_path / "state")
    with TestClient(create_app(context, preload=False)) as client:
        assert client.post("/v1/interactions", json=ROW, headers=headers).json()["accepted"] == 1
        # SQLite reports SQLITE_FULL, as on a full disk, once the file would outgrow max_page_count
        # (a per-connection setting; 1 means "no bigger than now").
        event.listen(context.store.engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA max_page_count = 1"))
        context.store.engine.dispose()
        batch = [{"prompt": f"question {i} " + "x" * 4000, "response": "ok"} for i in range(50)]
        refused = client.post("/v1/interactions", json=batch, headers=headers)
        body = assert_problem(refused, 507)
        assert "nothing of this request was stored" in body["detail"] and "selftune.db" not in refused.text
        assert len(client.get("/v1/interactions", headers=headers).json()["data"]) == 1
    assert count(tmp_path / "state") == 1  # not one row of the 50
    context.store.engine.dispose()


@pytest.mark.postgres
def test_on_postgresql_a_held_table_lock_is_503_after_the_configured_timeout(tmp_path: Path, pg_url: str) -> None:
    context, headers = bare_state(tmp_path / "state", f'[storage]\ndatabase_url = "{pg_url}"\nbusy_timeout_ms = 200\n')
    holder = create_engine(pg_url)
    with TestClient(create_app(context, preload=False)) as client, holder.connect() as other, other.begin():
        other.exec_driver_sql("LOCK TABLE interactions IN SHARE MODE")  # blocks inserts, not reads
        started = time.monotonic()
        refused = client.post("/v1/interactions", json=ROW, headers=headers)
        assert_problem(refused, 503)
        assert refused.headers["retry-after"] == "5" and time.monotonic() - started < 5  # lock_timeout, not forever
        assert client.get("/v1/interactions", headers=headers).json()["data"] == []
    holder.dispose()
    context.store.engine.dispose()  # before the schema is dropped
