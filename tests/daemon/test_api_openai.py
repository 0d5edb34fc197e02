"""The `openai` Python package, its base_url at a real `selftune serve`, gets answers from the champion."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai


def test_openai_client_chats_with_the_champion_and_feedback_follows(
        make_state: Callable[..., Path], token_for: Callable[[Path, str], str],
        server_process: Callable[..., Any]) -> None:
    state = make_state("[schedule]\nenabled = false\n")
    ingest_token, admin_token = token_for(state, "ingest"), token_for(state, "admin")
    server = server_process(state).start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ingest_token, max_retries=0)
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {admin_token}"})

    assert [m.id for m in client.models.list()] == ["main", "main@champion", "main@0", "auto"]
    messages = [{"role": "user", "content": "What is a list comprehension?"}]
    completion = client.chat.completions.create(model="main", messages=messages, max_tokens=8, temperature=0.8, seed=3)
    answer = completion.choices[0].message.content
    assert (completion.model, completion.system_fingerprint) == ("main@0", "generation-0")
    assert answer and completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 8

    logged = admin.get(f"/v1/interactions/{completion.id}").json()  # the chatcmpl- id finds the interaction
    assert logged["messages"] == [*messages, {"role": "assistant", "content": answer}]
    feedback = httpx.post(f"{server.url}/v1/interactions/{completion.id}/feedback",
                          headers={"Authorization": f"Bearer {ingest_token}"},
                          json={"thumbs": "down", "correction": "A compact way to build a list."})
    assert feedback.status_code == 201
    stored = admin.get(f"/v1/interactions/{completion.id}").json()["feedback"]
    assert [(f["kind"], f.get("corrected_response")) for f in stored] == [
        ("thumbs", None), ("correction", "A compact way to build a list.")]

    stream = client.chat.completions.create(model="main", messages=messages, max_tokens=8, temperature=0.8, seed=3,
                                            stream=True)
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer  # same seed, same champion, same answer: streamed piece by piece
    interaction_id = chunks[-1].model_extra["interaction_id"]
    assert admin.get(f"/v1/interactions/{interaction_id}").json()["messages"][-1]["content"] == streamed

    try:
        client.chat.completions.create(model="nope", messages=messages)
    except openai.NotFoundError as error:
        assert "nope" in str(error) and error.code == "model_not_found" and "main, auto" in str(error)
    else:
        raise AssertionError("an unknown model must be a 404")
    try:
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="st_wrong", max_retries=0).models.list()
    except openai.AuthenticationError:
        pass
    else:
        raise AssertionError("a wrong token must be a 401")
    assert server.terminate() == 0
