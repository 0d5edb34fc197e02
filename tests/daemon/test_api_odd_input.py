"""Odd input on SQLite and PostgreSQL alike: each probe is a 4xx naming its field, and changes nothing.

The probes are the server errors of issue 17 (point 2): an id past 64 bits, a row nested 300 levels deep, a
seed past 64 bits, lone surrogates, NUL characters (which PostgreSQL cannot store, so both backends refuse
them), and feedback by the hundred thousand. ``test_api_fuzz`` sends generated variants of them.
"""

from __future__ import annotations

import io
import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from selftune.policies.ingest import MAX_FEEDBACK_ITEMS, MAX_JSON_DEPTH, RowDefaults

from selftune.daemon import ingest
from selftune.daemon.context import Context
from selftune.daemon.http.app import create_app

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
ROW = {"prompt": "q", "response": "a"}
CHAT = {"model": "main", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
NUL, SURROGATE = "\x00", "\ud800"
ODD_TEXT = {"NUL character": NUL, "surrogate": SURROGATE}
"""Each odd character, by what a refusal of it says."""
INT64_MAX = str(2**63 - 1)
_rows = itertools.count()


def row(**fields: Any) -> dict[str, Any]:
    """A valid row of its own content: were it wrongly accepted, it would be written, not a duplicate."""
    return {"prompt": f"probe {next(_rows)}", "response": "a", **fields}


def nested(depth: int) -> Any:
    """``depth`` levels of objects around a string."""
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


def encode(value: Any) -> bytes:
    """JSON as ``json.dumps`` writes it (lone surrogates as ``\\ud800`` escapes, NaN as NaN); bytes as they are."""
    return value if isinstance(value, bytes) else json.dumps(value, allow_nan=True).encode()


# (name, method, path, body, the field the refusal names, a word its message says)
Probe = tuple[str, str, str, Any, str, str]
PROBES: list[Probe] = [
    ("after past 64 bits", "GET", "/v1/interactions?after=9223372036854775808", None, "after", INT64_MAX),
    ("row nested 300 deep", "POST", "/v1/interactions", row(meta=nested(300)), "body", "nested over"),
    ("batch row nested 300 deep", "POST", "/v1/interactions", [row(), row(meta=nested(300))], "body[1]", "nested over"),
    ("feedback nested 1000 deep", "POST", "/v1/interactions/1/feedback", b"[" * 1000 + b'"up"' + b"]" * 1000, "body",
     "not lists"),
    ("chat seed past 64 bits", "POST", "/v1/chat/completions", {**CHAT, "seed": 2**64}, "seed", INT64_MAX),
    ("feedback list over the cap", "POST", "/v1/interactions/1/feedback", ["up"] * (MAX_FEEDBACK_ITEMS + 1), "body",
     f"over {MAX_FEEDBACK_ITEMS}"),
    ("row feedback over the cap", "POST", "/v1/interactions", row(feedback=["up"] * (MAX_FEEDBACK_ITEMS + 1)), "body",
     f"over {MAX_FEEDBACK_ITEMS}"),
]
for kind, odd in ODD_TEXT.items():
    chat_message = {"role": "user", "content": f"hi{odd}"}
    PROBES += [(f"{kind} in {name}", method, path, payload, field, kind) for name, method, path, payload, field in [
        ("content", "POST", "/v1/interactions", {"prompt": f"a{odd}b", "response": "a"}, "body"),
        ("a response", "POST", "/v1/interactions", {"messages": [{"role": "user", "content": "q"}, {
            "role": "assistant", "content": odd}]}, "body"),
        ("id", "POST", "/v1/interactions", row(id=f"x{odd}"), "body"),
        ("domain", "POST", "/v1/interactions", row(domain=f"d{odd}"), "body"),
        ("tags", "POST", "/v1/interactions", row(tags=[f"t{odd}"]), "body"),
        ("a metadata key", "POST", "/v1/interactions", row(meta={f"k{odd}": 1}), "body"),
        ("a metadata value", "POST", "/v1/interactions", row(meta=[{"k": f"v{odd}"}]), "body"),
        ("a row's feedback", "POST", "/v1/interactions", row(feedback={"correction": odd}), "body"),
        ("a comment", "POST", "/v1/interactions/1/feedback", {"thumbs": "up", "comment": f"c{odd}"}, "body"),
        ("chat content", "POST", "/v1/chat/completions", {**CHAT, "messages": [chat_message]}, "messages[0].content"),
        ("a chat text part", "POST", "/v1/chat/completions",
         {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": odd}]}]}, "messages[0].content"),
        ("chat domain", "POST", "/v1/chat/completions", {**CHAT, "domain": f"d{odd}"}, "domain"),
        ("chat tags", "POST", "/v1/chat/completions", {**CHAT, "tags": [odd]}, "tags[0]"),
        ("chat user", "POST", "/v1/chat/completions", {**CHAT, "user": odd}, "user"),
        ("chat stop", "POST", "/v1/chat/completions", {**CHAT, "stop": ["s", odd]}, "stop"),
    ]]
# A URL carries UTF-8, which has no lone surrogates (Starlette reads bad bytes as U+FFFD): NUL is the odd one.
# (A lone surrogate in `model` is refused by pydantic itself, as "not a unicode string".)
PROBES += [(f"NUL in {name}", method, path, payload, field, "NUL character") for name, method, path, payload, field in [
    ("chat model", "POST", "/v1/chat/completions", {**CHAT, "model": f"main{NUL}"}, "model"),
    ("?branch", "POST", "/v1/interactions?" + urlencode({"branch": f"m{NUL}"}), row(), "branch"),
    ("?domain", "POST", "/v1/interactions?" + urlencode({"domain": f"d{NUL}"}), row(), "domain"),
    ("listing ?branch", "GET", "/v1/interactions?" + urlencode({"branch": NUL}), None, "branch"),
    ("listing ?domain", "GET", "/v1/interactions?" + urlencode({"domain": NUL}), None, "domain"),
    ("a chat id", "GET", f"/v1/interactions/{quote('chatcmpl-' + NUL)}", None, "interaction_id"),
    ("a feedback target", "POST", f"/v1/interactions/{quote('chatcmpl-' + NUL)}/feedback", "up", "interaction_id"),
]]


@dataclass
class Api:
    client: TestClient
    headers: dict[str, str]
    context: Context

    def snapshot(self) -> tuple[int, ...]:
        """(count, max id) of interactions, then of feedback."""
        with self.context.store.engine.connect() as connection:
            return tuple(value for table in ("interactions", "feedback") for value in connection.execute(
                text(f"SELECT count(*), coalesce(max(id), 0) FROM {table}")).one())

    def send(self, method: str, path: str, payload: Any) -> Any:
        return self.client.request(method, path, content=None if payload is None else encode(payload),
                                   headers=self.headers)


@pytest.fixture(params=BACKENDS)
def api(request: pytest.FixtureRequest, make_state: Callable[..., Path],
        token_for: Callable[[Path, str], str]) -> Iterator[Api]:
    config = "" if request.param == "sqlite" else f'[storage]\ndatabase_url = "{request.getfixturevalue("pg_url")}"\n'
    state = make_state(config)
    context = Context.open(str(state))
    # Chat answers of a token or two; bodies and listing pages of at most 400 kB.
    server = replace(context.config.server, default_max_tokens=1, max_tokens_limit=2, max_body_bytes=400_000)
    small = replace(context.config, server=server)
    context = Context(context.state, context.config_file, small)
    headers = {"Authorization": f"Bearer {token_for(state, 'admin')}", "content-type": "application/json"}
    with TestClient(create_app(context), raise_server_exceptions=False) as client:
        for _ in range(300):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        anchor = client.post("/v1/interactions", json=ROW, headers=headers)
        assert anchor.status_code == 200 and anchor.json()["id"] == 1, anchor.text  # feedback probes target it
        yield Api(client, headers, context)
    context.store.engine.dispose()


def test_each_odd_input_is_refused_naming_its_field(api: Api) -> None:
    before = api.snapshot()
    wrong = []
    for name, method, path, payload, field, says in PROBES:
        response = api.send(method, path, payload)
        errors = response.json().get("errors", []) if response.status_code >= 400 else []
        if response.status_code not in (400, 422) or not any(e["field"] == field and says in e["message"]
                                                             for e in errors):
            wrong.append(f"{name}: {response.status_code} {response.text[:300]}")
    assert not wrong, "\n".join(wrong)
    assert api.snapshot() == before  # nothing of any refused request was written


def test_metadata_nests_up_to_its_limit_and_no_further(api: Api) -> None:
    deepest = row(meta=nested(MAX_JSON_DEPTH))
    stored = api.send("POST", "/v1/interactions", deepest)
    assert stored.status_code == 200, stored.text
    listed = api.send("GET", f"/v1/interactions/{stored.json()['id']}", None)
    assert listed.status_code == 200 and listed.json()["metadata"]["meta"] == deepest["meta"]
    too_deep = api.send("POST", "/v1/interactions", row(meta=nested(MAX_JSON_DEPTH + 1)))
    assert too_deep.status_code == 422 and f"'meta' is nested over {MAX_JSON_DEPTH} levels" in too_deep.text


def test_a_jsonl_file_is_refused_line_by_line_for_the_same_rows() -> None:
    """``selftune ingest`` reads files with the same parser: each odd row is a rejected line, saying why."""
    rows = [(says, payload) for _, _, path, payload, _, says in PROBES
            if path == "/v1/interactions" and isinstance(payload, dict)]
    lines = io.BytesIO(b"".join(encode(payload) + b"\n" for _, payload in rows))
    report = ingest.check(lines, "auto", RowDefaults())
    assert report.result.rejected == len(rows) <= ingest.MAX_ERRORS_SHOWN
    for (says, _), error in zip(rows, report.errors, strict=True):
        # (orjson refuses a lone surrogate's escape as it parses: "not valid JSON (no low surrogate ...)".)
        assert says in str(error), error


def test_a_listing_page_is_bounded_in_bytes(api: Api) -> None:
    """A page stops before it passes server.max_body_bytes (one row at least): next_after continues it."""
    limit = api.context.config.server.max_body_bytes
    for _ in range(6):
        assert api.send("POST", "/v1/interactions", row(response="x" * (limit // 4))).status_code == 200
    first = api.send("GET", "/v1/interactions?limit=1000", None)
    assert first.status_code == 200 and len(first.content) <= limit
    page = first.json()
    assert 1 < len(page["data"]) < 7 and page["next_after"] == page["data"][-1]["id"]
    rest = api.send("GET", f"/v1/interactions?limit=1000&after={page['next_after']}", None).json()
    assert len(page["data"]) + len(rest["data"]) == 7 and rest["next_after"] is None
