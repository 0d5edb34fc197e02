"""Clients that go away: a chat stops generating and its partial answer is stored flagged, never trained on; a
body cut short is no server error. One real `selftune serve` on the tiny model, real sockets."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import ServerProcess

PROMPT = [{"role": "user", "content": "Tell me a long story."}]
MAX_TOKENS = 400
"""What each chat asks for: the tiny model (512 positions) has room for it, and never ends by itself before."""


@dataclass
class Served:
    server: ServerProcess
    ingest: dict[str, str]
    admin: httpx.Client


@pytest.fixture(scope="module")
def served(make_state: Callable[..., Path], token_for: Callable[[Path, str], str]) -> Iterator[Served]:
    state = make_state("[schedule]\nenabled = false\n")
    server = ServerProcess(state).start()
    admin = httpx.Client(base_url=server.url, timeout=10,
                         headers={"Authorization": f"Bearer {token_for(state, 'admin')}"})
    yield Served(server, {"Authorization": f"Bearer {token_for(state, 'ingest')}"}, admin)
    admin.close()
    server.kill()


def stored_in(served: Served, domain: str, timeout: float = 20) -> dict[str, Any]:
    """The one interaction logged in ``domain``, once it is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = served.admin.get("/v1/interactions", params={"domain": domain}).json()["data"]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no interaction in domain {domain!r} within {timeout} s:\n{served.server.log_text()}")


def test_a_stream_closed_after_the_first_chunk_stores_its_partial_answer_flagged(served: Served) -> None:
    body = {"model": "main", "messages": PROMPT, "max_tokens": MAX_TOKENS, "stream": True, "domain": "streamed"}
    received = ""
    with httpx.stream("POST", f"{served.server.url}/v1/chat/completions", json=body, headers=served.ingest,
                      timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                received += json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            if received:
                break  # the first chunk with answer text: the client goes away
    logged = stored_in(served, "streamed")
    answer = logged["messages"][-1]
    assert logged["metadata"]["finish_reason"] == "client_disconnected"
    assert answer["role"] == "assistant" and answer["content"].startswith(received)
    assert 0 < logged["metadata"]["usage"]["completion_tokens"] < MAX_TOKENS / 4, logged["metadata"]


def test_a_plain_chat_whose_client_goes_away_stops_generating(served: Served) -> None:
    body = {"model": "main", "messages": PROMPT, "max_tokens": MAX_TOKENS, "domain": "plain"}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up while the answer generates, and closes
        httpx.post(f"{served.server.url}/v1/chat/completions", json=body, headers=served.ingest, timeout=0.2)
    logged = stored_in(served, "plain")
    assert logged["metadata"]["finish_reason"] == "client_disconnected"
    # all MAX_TOKENS took 4.9 s on 2 busy cores (20 were stored after a 0.3 s timeout): it stopped early
    assert logged["metadata"]["usage"]["completion_tokens"] < MAX_TOKENS / 2, logged["metadata"]
    metrics = httpx.get(f"{served.server.url}/metrics").text
    assert 'route="/v1/chat/completions",status="499"' in metrics  # nginx's "client closed request"


def requests_counted(served: Served, path: str) -> dict[str, float]:
    """Status -> requests to ``path`` that /metrics counts."""
    text = httpx.get(f"{served.server.url}/metrics").text
    found = re.findall(re.escape(f'{{method="POST",route="{path}",status="') + r'(\d+)"} (\S+)', text)
    return {status: float(value) for status, value in found}


@pytest.mark.parametrize("path", ["/v1/interactions", "/v1/chat/completions"])
def test_a_body_cut_short_is_no_server_error(served: Served, path: str) -> None:
    before = requests_counted(served, path)
    with socket.create_connection(("127.0.0.1", served.server.port)) as client:
        client.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: {served.ingest['Authorization']}\r\n"
                       "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"prompt":')
        time.sleep(0.2)  # the server reads the 10 bytes, then the connection closes
    for _ in range(100):
        after = requests_counted(served, path)
        if after != before:
            break
        time.sleep(0.05)
    counted = {status: n - before.get(status, 0) for status, n in after.items() if n != before.get(status)}
    assert counted == {"499": 1}  # not a 500, nor a 400 "not valid JSON": nginx's "client closed request"
    log = served.server.log_text()
    assert "Traceback" not in log and " ERROR " not in log, log
