"""The HTTP API in-process (FastAPI's TestClient): real SQLite, the tiny model, real tokens."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from selftune.policies.ingest import FORMATS, KNOWN_KEYS, OPENAI_ROLES, SHAREGPT_ROLES
from selftune.policies.records import FEEDBACK_KINDS

from selftune.daemon.http.app import create_app
from selftune.daemon.http.schemas import ROW_MODELS
from selftune.daemon.http.state import service_state
from selftune.daemon.context import Context

PROBLEM = "application/problem+json"
ROW = {"prompt": "What is 2 + 2?", "response": "4."}


def wait_ready(client: TestClient) -> None:
    for _ in range(300):
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(client.get("/readyz").text)


@pytest.fixture(scope="module")
def state(make_state: Callable[..., Path]) -> Path:
    return make_state()


@pytest.fixture(scope="module")
def context(state: Path) -> Context:
    return Context.open(str(state))


@pytest.fixture(scope="module")
def admin(state: Path, token_for: Callable[[Path, str], str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(state, 'admin')}"}


@pytest.fixture(scope="module")
def ingest(state: Path, token_for: Callable[[Path, str], str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(state, 'ingest')}"}


@pytest.fixture(scope="module")
def client(context: Context) -> Iterator[TestClient]:
    with TestClient(create_app(context), raise_server_exceptions=False) as client:
        wait_ready(client)
        yield client


def count(state: Path, table: str = "interactions") -> int:
    with sqlite3.connect(state / "selftune.db") as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def assert_problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    if field is not None:
        assert field in [e["field"] for e in body.get("errors", [])], body
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body


# -- security -----------------------------------------------------------------------------------------


def test_writes_and_reads_of_content_need_a_token_of_the_right_scope(
        client: TestClient, state: Path, admin: dict[str, str], ingest: dict[str, str]) -> None:
    before = count(state)
    no_token = assert_problem(client.post("/v1/interactions", json=ROW), 401)
    assert "Bearer" in no_token["detail"]
    assert client.post("/v1/interactions", json=ROW).headers["www-authenticate"] == "Bearer"
    assert_problem(client.post("/v1/interactions", json=ROW, headers={"Authorization": "Bearer st_nope"}), 401)
    assert_problem(client.post("/v1/interactions", json=ROW, headers={"Authorization": "Basic dTpw"}), 401)
    assert count(state) == before  # nothing written without a valid token
    assert_problem(client.get("/v1/interactions"), 401)
    assert_problem(client.get("/v1/interactions", headers=ingest), 403)
    assert_problem(client.get("/v1/generations", headers=ingest), 403)
    assert_problem(client.post("/v1/generations/0/promote", headers=ingest), 403)
    assert_problem(client.post("/v1/cycles", json={}, headers=ingest), 403)
    assert client.get("/v1/interactions", headers=admin).status_code == 200
    assert client.get("/v1/models", headers=ingest).status_code == 200
    for open_path in ("/livez", "/readyz", "/metrics", "/openapi.json"):
        assert client.get(open_path).status_code == 200, open_path


def test_a_revoked_token_is_refused_at_once(client: TestClient, context: Context, state: Path,
                                            token_for: Callable[[Path, str], str]) -> None:
    secret = token_for(state, "ingest")
    headers = {"Authorization": f"Bearer {secret}"}
    assert client.post("/v1/interactions", json={**ROW, "id": "revoke-me"}, headers=headers).status_code == 200
    with context.store.transaction(write=True) as tx:
        token = next(t for t in tx.tokens.list() if tx.tokens.verify(secret) and t.id == tx.tokens.verify(secret).id)
        tx.tokens.revoke(token.id)
    assert_problem(client.post("/v1/interactions", json=ROW, headers=headers), 401)


# -- ingest -------------------------------------------------------------------------------------------


def test_one_row_is_stored_once_and_answers_its_id(client: TestClient, state: Path, ingest: dict[str, str]) -> None:
    row = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi!"}],
           "id": "ext-1", "domain": "greetings", "feedback": "up"}
    first = client.post("/v1/interactions", json=row, headers=ingest)
    assert first.status_code == 200, first.text
    assert first.json()["accepted"] == 1 and first.json()["duplicates"] == 0
    again = client.post("/v1/interactions", json=row, headers=ingest).json()
    assert again == {"accepted": 0, "duplicates": 1, "rejected": 0, "id": first.json()["id"]}
    with sqlite3.connect(state / "selftune.db") as con:
        stored = con.execute("SELECT external_id, domain, source FROM interactions WHERE id = ?",
                             (first.json()["id"],)).fetchone()
        thumbs = con.execute("SELECT count(*) FROM feedback WHERE interaction_id = ?", (first.json()["id"],)).fetchone()
    assert stored == ("ext-1", "greetings", "api") and thumbs == (1,)


def test_a_row_without_an_external_id_answers_its_id_too(client: TestClient, ingest: dict[str, str],
                                                         admin: dict[str, str]) -> None:
    row = {"prompt": f"unique prompt {time.time_ns()}", "response": "yes"}
    answer = client.post("/v1/interactions", json=row, headers=ingest).json()
    stored = client.get(f"/v1/interactions/{answer['id']}", headers=admin).json()
    assert stored["messages"][0]["content"] == row["prompt"]


def test_a_batch_in_every_format_with_branch_and_domain(client: TestClient, state: Path,
                                                        ingest: dict[str, str]) -> None:
    batch = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "id": "batch-1"},
        {"conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}], "id": "batch-2"},
        {"prompt": "e", "response": "f", "id": "batch-3", "domain": "own"},
        {"prompt": "e", "response": "f", "id": "batch-3"},  # the same row twice in one batch
    ]
    before = count(state)
    answer = client.post("/v1/interactions?branch=main&domain=letters", json=batch, headers=ingest)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"accepted": 3, "duplicates": 1, "rejected": 0, "id": None}
    assert count(state) == before + 3
    with sqlite3.connect(state / "selftune.db") as con:
        domains = dict(con.execute("SELECT external_id, domain FROM interactions WHERE external_id LIKE 'batch-%'"))
    assert domains == {"batch-1": "letters", "batch-2": "letters", "batch-3": "own"}


def test_a_batch_with_one_bad_row_is_refused_whole_naming_the_row(client: TestClient, state: Path,
                                                                  ingest: dict[str, str]) -> None:
    batch = [{"prompt": "ok", "response": "fine", "id": "whole-1"}, {"prompt": "no response"},
             {"messages": [{"role": "robot", "content": "x"}]}]
    before = count(state), count(state, "feedback")
    body = assert_problem(client.post("/v1/interactions", json=batch, headers=ingest), 422)
    assert [e["field"] for e in body["errors"]] == ["body[1]", "body[2]"]
    assert "response" in body["errors"][0]["message"] and "robot" in body["errors"][1]["message"]
    assert (count(state), count(state, "feedback")) == before


@pytest.mark.parametrize(("body", "field"), [
    (b"", "body"), (b"{not json", "body"), (b"42", "body"), (b"[]", "body"), (b'"text"', "body"),
    (b'{"prompt": "p", "response": "r", "feedback": "sideways"}', "body"),
])
def test_malformed_bodies_are_problems_naming_the_body(client: TestClient, ingest: dict[str, str], body: bytes,
                                                       field: str) -> None:
    headers = {**ingest, "content-type": "application/json"}
    assert_problem(client.post("/v1/interactions", content=body, headers=headers), 422, field)


def test_query_parameters_are_checked(client: TestClient, ingest: dict[str, str]) -> None:
    assert_problem(client.post("/v1/interactions?branch=nope", json=ROW, headers=ingest), 422, "branch")
    assert_problem(client.post("/v1/interactions?format=csv", json=ROW, headers=ingest), 422, "format")


def test_bodies_and_batches_are_bounded(context: Context, state: Path, ingest: dict[str, str]) -> None:
    small = replace(context.config, server=replace(context.config.server, max_body_bytes=2048, max_batch_rows=5))
    limited = Context(context.state, context.config_file, small)
    before = count(state)
    with TestClient(create_app(limited, preload=False), raise_server_exceptions=False) as client:
        big = [{"prompt": "x" * 300, "response": "y", "id": f"big-{i}"} for i in range(10)]
        assert_problem(client.post("/v1/interactions", json=big, headers=ingest), 413, "body")

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while the body streams in
            yield b"["
            for i in range(20):
                yield json.dumps({"prompt": "x" * 200, "response": "y", "id": f"chunk-{i}"}).encode() + b","
            yield b'{"prompt": "a", "response": "b"}]'

        assert_problem(client.post("/v1/interactions", content=chunks(), headers=ingest), 413)
        six = [{"prompt": f"p{i}", "response": "r"} for i in range(6)]
        assert "max_batch_rows" in assert_problem(client.post("/v1/interactions", json=six, headers=ingest),
                                                  422, "body")["detail"]
    assert count(state) == before


# -- feedback and reading ---------------------------------------------------------------------------------


def test_feedback_in_every_shape_and_its_errors(client: TestClient, ingest: dict[str, str],
                                                admin: dict[str, str]) -> None:
    interaction = client.post("/v1/interactions", json={**ROW, "id": "fb-1"}, headers=ingest).json()["id"]
    stored = client.post(f"/v1/interactions/{interaction}/feedback", headers=ingest,
                         json=[{"thumbs": "down", "comment": "wrong"}, {"correction": "Four."}, 0.5])
    assert stored.status_code == 201, stored.text
    assert [f["kind"] for f in stored.json()["feedback"]] == ["thumbs", "correction", "score"]
    read = client.get(f"/v1/interactions/{interaction}", headers=admin).json()
    assert [(f["kind"], f.get("corrected_response")) for f in read["feedback"]] == [
        ("thumbs", None), ("correction", "Four."), ("score", None)]
    assert_problem(client.post("/v1/interactions/999999/feedback", json="up", headers=ingest), 404)
    assert_problem(client.post("/v1/interactions/chatcmpl-unknown/feedback", json="up", headers=ingest), 404)
    assert_problem(client.post(f"/v1/interactions/{interaction}/feedback", json={"stars": 5}, headers=ingest),
                   422, "body")
    assert_problem(client.post(f"/v1/interactions/{interaction}/feedback", json=[], headers=ingest), 422, "body")


def test_listing_is_filtered_and_paginated(client: TestClient, ingest: dict[str, str], admin: dict[str, str]) -> None:
    rows = [{"prompt": f"page {i}", "response": "r", "id": f"page-{i}", "domain": "paging"} for i in range(5)]
    client.post("/v1/interactions", json=rows, headers=ingest)
    first = client.get("/v1/interactions?domain=paging&limit=3", headers=admin).json()
    second = client.get(f"/v1/interactions?domain=paging&limit=3&after={first['next_after']}", headers=admin).json()
    assert [r["external_id"] for r in first["data"] + second["data"]] == [f"page-{i}" for i in range(5)]
    assert second["next_after"] is None
    assert_problem(client.get("/v1/interactions?limit=0", headers=admin), 422, "limit")
    assert_problem(client.get("/v1/interactions/nope", headers=admin), 404)


# -- chat ---------------------------------------------------------------------------------------------------

CHAT = {"model": "main", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 6, "temperature": 1.0, "seed": 7}


def test_chat_completion_is_logged_under_its_id_and_takes_feedback(client: TestClient, ingest: dict[str, str],
                                                                   admin: dict[str, str]) -> None:
    response = client.post("/v1/chat/completions", json=CHAT, headers=ingest)
    assert response.status_code == 200, response.text
    body = response.json()
    answer = body["choices"][0]["message"]["content"]
    assert body["object"] == "chat.completion" and answer and body["system_fingerprint"] == "generation-0"
    assert body["usage"]["completion_tokens"] <= 6 and body["usage"]["prompt_tokens"] > 0
    logged = client.get(f"/v1/interactions/{body['id']}", headers=admin).json()
    assert logged["messages"] == [*CHAT["messages"], {"role": "assistant", "content": answer}]
    assert logged["source"] == "api:chat" and logged["metadata"]["generation"] == 0
    again = client.post("/v1/chat/completions", json=CHAT, headers=ingest).json()
    assert again["choices"][0]["message"]["content"] == answer  # same seed, same answer ...
    assert again["id"] != body["id"]  # ... but a second exchange, logged on its own
    feedback = client.post(f"/v1/interactions/{body['id']}/feedback", json="up", headers=ingest)
    assert feedback.status_code == 201 and feedback.json()["interaction_id"] == body["interaction_id"]


def test_chat_completion_streams_server_sent_events(client: TestClient, ingest: dict[str, str],
                                                    admin: dict[str, str]) -> None:
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 8}
    with client.stream("POST", "/v1/chat/completions", json=request, headers=ingest) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["usage"]["completion_tokens"] <= 8
    logged = client.get(f"/v1/interactions/{last['interaction_id']}", headers=admin).json()
    assert logged["messages"][-1] == {"role": "assistant", "content": text} and logged["external_id"] == chunks[0]["id"]
    by_chunk_id = client.post(f"/v1/interactions/{chunks[0]['id']}/feedback", json={"score": 2}, headers=ingest)
    assert by_chunk_id.status_code == 201 and by_chunk_id.json()["interaction_id"] == last["interaction_id"]


def test_stop_strings_end_the_answer_and_are_left_out(client: TestClient, ingest: dict[str, str]) -> None:
    full = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 12}, headers=ingest).json()
    text = full["choices"][0]["message"]["content"]
    stop = text[len(text) // 2:][:3]
    cut = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 12, "stop": [stop]}, headers=ingest).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.index(stop)].strip() or \
        text.startswith(cut["choices"][0]["message"]["content"])
    assert stop not in cut["choices"][0]["message"]["content"] and cut["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("change", "status", "field"), [
    ({"model": "nope"}, 404, "model"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages"),
    ({"messages": [{"role": "assistant", "content": "only me"}]}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0].type"),
    ({"max_tokens": 100000}, 400, "max_tokens"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"temperature": 5}, 400, "temperature"),
    ({"n": 2}, 400, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"domain": ""}, 400, "domain"),
])
def test_bad_chat_requests_name_the_field(client: TestClient, ingest: dict[str, str], change: dict[str, Any],
                                          status: int, field: str) -> None:
    assert_problem(client.post("/v1/chat/completions", json={**CHAT, **change}, headers=ingest), status, field)


def test_models_are_the_names_that_answer(client: TestClient, ingest: dict[str, str]) -> None:
    models = client.get("/v1/models", headers=ingest).json()
    assert models["object"] == "list"
    assert [(m["id"], m["generation"]) for m in models["data"]][:3] == [("main", 0), ("main@champion", 0),
                                                                          ("main@0", 0)]
    assert models["data"][-1]["id"] == "auto"


# -- generations --------------------------------------------------------------------------------------------


def add_generation(context: Context, tiny_model_dir: Path, seed: int, report: str | None = None) -> int:
    """A second model (same architecture, other weights) recorded as a candidate of ``main``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def fill(directory: Path) -> dict[str, Any]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        torch.manual_seed(seed)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.5)
        model.save_pretrained(directory)
        AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
        if report is not None:
            (directory / "report.html").write_text(report)
        return {"params": sum(p.numel() for p in model.parameters())}

    with context.store.transaction() as tx:
        generation_id = max(g.id for g in tx.generations.list()) + 1
    context.artifacts.write(generation_id, fill, {"parent": 0, "branch": "main"})
    manifest = context.artifacts.verify(generation_id)
    with context.store.transaction(write=True) as tx:
        tx.generations.add("main", str(context.artifacts.root / str(generation_id)), manifest["checksum"],
                           manifest["params"], parent_id=0, status="candidate", id=generation_id)
    return generation_id


def test_a_promoted_generation_answers_the_next_request(client: TestClient, context: Context, tiny_model_dir: Path,
                                                        ingest: dict[str, str], admin: dict[str, str]) -> None:
    before = client.post("/v1/chat/completions", json=CHAT, headers=ingest).json()
    generation = add_generation(context, tiny_model_dir, seed=1, report="<html><h1>report</h1></html>")
    assert client.get("/v1/generations", headers=admin).json()[-1]["id"] == generation
    promoted = client.post(f"/v1/generations/{generation}/promote", headers=admin)
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["aliases"] == ["champion"] and promoted.json()["status"] == "promoted"
    after = client.post("/v1/chat/completions", json=CHAT, headers=ingest).json()
    assert after["system_fingerprint"] == f"generation-{generation}" != before["system_fingerprint"]
    assert after["choices"][0]["message"]["content"] != before["choices"][0]["message"]["content"]
    report = client.get(f"/v1/generations/{generation}/report", headers=admin)
    assert report.status_code == 200 and "<h1>report</h1>" in report.text
    assert_problem(client.get(f"/v1/generations/{generation}/report?format=md", headers=admin), 404)
    assert client.get("/readyz").json()["champions"] == {"main": generation}
    assert client.post("/v1/generations/0/promote", headers=admin).status_code == 200  # and back


def test_the_lineage_page_lists_every_generation_and_needs_an_admin_token(
        client: TestClient, admin: dict[str, str], ingest: dict[str, str]) -> None:
    assert_problem(client.get("/v1/lineage", headers=ingest), 403)
    page = client.get("/v1/lineage", headers=admin)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for generation in client.get("/v1/generations", headers=admin).json():
        assert f"/v1/generations/{generation['id']}/report" in page.text or generation["id"] == 0


def test_a_browser_signs_in_once_and_follows_the_lineage_page_to_the_reports(
        context: Context, admin: dict[str, str], ingest: dict[str, str], tiny_model_dir: Path) -> None:
    generation = add_generation(context, tiny_model_dir, seed=11, report="<h1>the report of a candidate</h1>")
    secret = admin["Authorization"].removeprefix("Bearer ")
    with TestClient(create_app(context)) as browser:  # a client of its own: its cookies are its own
        wait_ready(browser)
        assert_problem(browser.get("/v1/lineage"), 401)
        assert_problem(browser.get("/v1/lineage?token=" + ingest["Authorization"].removeprefix("Bearer ")), 403)
        signed_in = browser.get(f"/v1/lineage?token={secret}", follow_redirects=False)
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/v1/lineage"
        cookie = signed_in.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and "Path=/v1" in cookie
        page = browser.get("/v1/lineage")  # the cookie from here on
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        links = re.findall(r'href="(/v1/generations/\d+/report)"', page.text)
        assert f"/v1/generations/{generation}/report" in links
        assert "the report of a candidate" in browser.get(f"/v1/generations/{generation}/report").text
        assert_problem(browser.post("/v1/generations/0/promote"), 401)  # a cookie never authorises a write


@pytest.mark.parametrize("reference", [str(2**63), "1" * 40, "\u0661\u0662"])
def test_feedback_on_an_id_no_interaction_can_have_is_404(client: TestClient, ingest: dict[str, str],
                                                           reference: str) -> None:
    """Found by the 5,000-body fuzz run: 2**63 overflowed SQLite's INTEGER and answered 500."""
    assert_problem(client.post(f"/v1/interactions/{reference}/feedback", json="up", headers=ingest), 404)


def test_unknown_generations_are_404(client: TestClient, admin: dict[str, str]) -> None:
    assert_problem(client.get("/v1/generations/4242", headers=admin), 404)
    assert_problem(client.post("/v1/generations/4242/promote", headers=admin), 404)
    assert_problem(client.get("/v1/generations/-1", headers=admin), 422)
    assert_problem(client.get("/v1/cycles/4242", headers=admin), 404)
    assert_problem(client.delete("/v1/cycles/4242", headers=admin), 404)


# -- health, metrics, documentation -------------------------------------------------------------------------


def test_metrics_use_selftune_names_with_units(client: TestClient, ingest: dict[str, str]) -> None:
    client.post("/v1/interactions", json={**ROW, "id": "metrics-1"}, headers=ingest)
    text = client.get("/metrics").text
    assert 'selftune_http_requests_total{method="POST",route="/v1/interactions",status="200"}' in text
    assert "selftune_http_request_duration_seconds_bucket" in text
    assert 'selftune_interactions_ingested_total{branch="main",outcome="accepted"}' in text
    assert re.search(r'^selftune_champion_info\{branch="main",generation="\d+"\} 1\.0$', text, re.M), text
    kinds = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE selftune_"))
    assert len(kinds) >= 10
    for name, kind in kinds.items():  # counters are exposed as NAME_total; the rest carry their unit
        assert kind == "counter" or name.endswith(("_seconds", "_info", "_running", "_ready")), (name, kind)


def test_openapi_documents_every_endpoint_and_the_bearer_scheme(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    expected = {("post", "/v1/interactions"), ("post", "/v1/interactions/{interaction_id}/feedback"),
                ("get", "/v1/interactions"), ("post", "/v1/chat/completions"), ("get", "/v1/models"),
                ("get", "/v1/generations"), ("get", "/v1/generations/{generation_id}"),
                ("get", "/v1/generations/{generation_id}/report"), ("post", "/v1/generations/{generation_id}/promote"),
                ("post", "/v1/cycles"), ("get", "/v1/cycles/{cycle_id}"), ("delete", "/v1/cycles/{cycle_id}"),
                ("get", "/livez"), ("get", "/readyz"), ("get", "/metrics")}
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert expected <= documented, expected - documented
    # each operation under one tag, so that /docs lists it once
    tags = {(method, path): op.get("tags") for path, item in document["paths"].items() for method, op in item.items()}
    assert all(len(t or []) == 1 for t in tags.values()), {k: t for k, t in tags.items() if len(t or []) != 1}
    assert tags[("get", "/v1/models")] == ["models"]
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    ingest_body = document["paths"]["/v1/interactions"]["post"]["requestBody"]["content"]["application/json"]
    assert len(ingest_body["schema"]["oneOf"]) == 2


def test_the_documented_ingest_rows_are_the_parsers_own_formats(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert set(ROW_MODELS) == set(FORMATS) - {"auto"}
    for fmt, model in ROW_MODELS.items():  # every key the parser knows is documented, and no other
        assert set(schemas[model.__name__]["properties"]) == KNOWN_KEYS[fmt], fmt
    assert schemas["ChatTurn"]["properties"]["role"]["enum"] == list(OPENAI_ROLES)
    assert set(schemas["ShareGptTurn"]["properties"]["from"]["enum"]) == set(SHAREGPT_ROLES)
    assert all(kind in schemas["Feedback"]["description"] for kind in FEEDBACK_KINDS)


def test_a_broken_database_is_a_500_problem_without_internals(make_state: Callable[..., Path],
                                                              token_for: Callable[[Path, str], str]) -> None:
    state = make_state()
    headers = {"Authorization": f"Bearer {token_for(state, 'ingest')}"}
    with sqlite3.connect(state / "selftune.db") as con:
        con.execute("ALTER TABLE interactions RENAME TO interactions_gone")
    with TestClient(create_app(Context.open(str(state)), preload=False), raise_server_exceptions=False) as client:
        response = client.post("/v1/interactions", json=ROW, headers=headers)
    body = assert_problem(response, 500)
    assert "incident" in body["detail"]
    for leak in ("sqlite", "interactions_gone", "SELECT", "INSERT", "OperationalError"):
        assert leak not in response.text


def test_while_stopping_writes_are_refused_and_reads_go_on(context: Context, ingest: dict[str, str]) -> None:
    app = create_app(context, preload=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        service_state(app).accepting = False  # what SIGTERM sets
        refused = client.post("/v1/interactions", json=ROW, headers=ingest)
        assert_problem(refused, 503)
        assert refused.headers["retry-after"] == "5"
        assert client.get("/livez").status_code == 200


def test_readyz_is_503_until_a_champion_is_loaded(context: Context) -> None:
    with TestClient(create_app(context, preload=False), raise_server_exceptions=False) as client:
        body = assert_problem(client.get("/readyz"), 503)
        assert "no champion loaded" in body["detail"]
        assert client.get("/livez").json() == {"status": "ok"}


@pytest.mark.postgres
def test_ingest_feedback_and_chat_on_postgresql(make_state: Callable[..., Path], pg_url: str,
                                                token_for: Callable[[Path, str], str]) -> None:
    state = make_state(f'[storage]\ndatabase_url = "{pg_url}"\n')
    headers = {"Authorization": f"Bearer {token_for(state, 'admin')}"}
    context = Context.open(str(state))
    with TestClient(create_app(context), raise_server_exceptions=False) as client:
        wait_ready(client)
        single = client.post("/v1/interactions", json=ROW, headers=headers).json()
        assert single["accepted"] == 1 and single["id"] is not None
        batch = client.post("/v1/interactions", json=[ROW, {**ROW, "id": "pg-1"}, {**ROW, "id": "pg-1"}],
                            headers=headers).json()
        assert (batch["accepted"], batch["duplicates"]) == (1, 2)
        assert client.post(f"/v1/interactions/{single['id']}/feedback", json="up", headers=headers).status_code == 201
        chat = client.post("/v1/chat/completions", json=CHAT, headers=headers).json()
        logged = client.get(f"/v1/interactions/{chat['id']}", headers=headers).json()
        assert logged["messages"][-1]["content"] == chat["choices"][0]["message"]["content"]
        assert_problem(client.post("/v1/interactions", json=[ROW, {"prompt": 1}], headers=headers), 422, "body[1]")
        ids = [r["id"] for r in client.get("/v1/interactions", headers=headers).json()["data"]]
    assert len(ids) == 3 and ids[0] == single["id"] and ids[-1] == chat["interaction_id"] and ids == sorted(ids)
    context.store.engine.dispose()
