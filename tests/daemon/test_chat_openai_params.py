"""OpenAI's formats all the way: fine-tuning and preference files ingest as they are, and the `openai` client finds
chat ids, refusals of what is not implemented, and the model's own token log-probabilities where it expects them."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from selftune.learners.chat import IGNORE_INDEX, encode_chat
from selftune.learners.evaluate import _bytes_to_unicode
from selftune.learners.jobs import interaction_row
from selftune.policies.ingest import RowDefaults

from selftune.daemon.context import Context
from selftune.daemon.http.app import create_app
from selftune.daemon.http.state import service_state
from selftune.daemon.ingest import check

FINE_TUNING_ROW = {"messages": [
    {"role": "developer", "content": "Answer with a chemical symbol."},
    {"role": "user", "content": [{"type": "text", "text": "Symbol of "}, {"type": "text", "text": "gold?"}]},
    {"role": "assistant", "content": "Silver is Ag.", "weight": 0},
    {"role": "user", "content": "No: gold?"},
    {"role": "assistant", "content": "Au", "weight": 1}]}
PREFERENCE_ROW = {"input": {"messages": [{"role": "user", "content": "Symbol of iron?"}], "tools": []},
                  "preferred_output": [{"role": "assistant", "content": "Fe"}],
                  "non_preferred_output": [{"role": "assistant", "content": "Ir"}]}
TOOL_ROW = {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}
ASK = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
SAMPLED = {"model": "main", "messages": ASK, "max_tokens": 6, "temperature": 1.0, "seed": 7}
"""The tiny model's greedy answer is blank lines (no answer at all): a seeded sample is a real one."""


@pytest.fixture(scope="module")
def served(make_state: Callable[..., Path], token_for: Callable[[Path, str], str]) -> Iterator[Any]:
    state = make_state()
    context = Context.open(str(state))
    admin = {"Authorization": f"Bearer {token_for(state, 'admin')}"}
    with TestClient(create_app(context), raise_server_exceptions=False, headers=admin) as client:
        client.get("/readyz")
        # the real `openai` package, speaking HTTP to the app through the test client's transport
        api = openai.OpenAI(base_url="http://testserver/v1", api_key=token_for(state, "ingest"), max_retries=0,
                            http_client=client)
        yield client, api, context
    context.store.engine.dispose()


def test_an_openai_fine_tuning_file_ingests_and_its_weight_0_turn_is_not_trained(served: Any) -> None:
    client, _, context = served
    added = client.post("/v1/interactions", json=[FINE_TUNING_ROW, PREFERENCE_ROW])
    assert added.status_code == 200 and added.json()["accepted"] == 2, added.text
    rows = client.get("/v1/interactions?limit=2").json()["data"]
    tuned, preferred = (client.get(f"/v1/interactions/{r['id']}").json() for r in rows[-2:])
    assert tuned["messages"][0] == {"role": "system", "content": "Answer with a chemical symbol."}
    assert tuned["messages"][1]["content"] == "Symbol of gold?"
    assert tuned["messages"][2] == {"role": "assistant", "content": "Silver is Ag.", "weight": 0}
    assert [m["content"] for m in preferred["messages"]] == ["Symbol of iron?", "Fe"]
    assert [(f["kind"], f["chosen"], f["rejected"]) for f in preferred["feedback"]] == [("preference", "Fe", "Ir")]

    # what a cycle's learner reads back from the database: the weight-0 turn is context, not a target
    with context.store.transaction() as tx:
        stored = tx.interactions.get(tuned["id"])
    learner_row = json.loads(json.dumps(interaction_row(stored)))  # as train.jsonl carries it
    tokenizer = service_state(client.app).pool.get("main").tokenizer
    ids, labels = encode_chat(tokenizer, learner_row)
    assert tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX]) == \
        f"Au{tokenizer.eos_token}"
    assert "Silver is Ag." in tokenizer.decode(ids)


def test_a_row_with_tool_calls_is_refused_naming_its_line() -> None:
    lines = [json.dumps(FINE_TUNING_ROW), json.dumps(TOOL_ROW)]
    report = check(io.BytesIO("\n".join(lines).encode()), "auto", RowDefaults())
    assert report.result.rejected == 1 and report.errors[0].line == 2
    assert "message 1 is a tool call or result ('tool_calls'): selftune does not train on tool use" in \
        str(report.errors[0])


def test_a_plain_answer_has_a_chatcmpl_id_like_a_streamed_one(served: Any) -> None:
    client, api, _ = served
    raw = api.chat.completions.with_raw_response.create(**SAMPLED)
    completion = raw.parse()
    interaction = completion.model_extra["interaction_id"]
    assert completion.id.startswith("chatcmpl-") and isinstance(interaction, int)
    assert raw.headers["x-selftune-interaction"] == str(interaction)
    assert client.get(f"/v1/interactions/{completion.id}").json()["id"] == interaction
    assert client.get(f"/v1/interactions/{interaction}").json()["messages"][0]["role"] == "system"  # developer
    chunks = list(api.chat.completions.create(**SAMPLED, stream=True))
    assert chunks[0].id.startswith("chatcmpl-") and chunks[0].id != completion.id


@pytest.mark.parametrize(("change", "param", "code"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", "unsupported_parameter"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    ({"logit_bias": {"42": 10}}, "logit_bias", "unsupported_parameter"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "unsupported_parameter"),
    ({"n": 2}, "n", "unsupported_value"),
    ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"messages": TOOL_ROW["messages"][:2]}, "messages[1].tool_calls", "unsupported_parameter"),
    ({"temperature": 5}, "temperature", None),  # pydantic's own checks are 400 too
])
def test_what_is_not_implemented_is_a_400_naming_the_parameter(served: Any, change: dict[str, Any], param: str,
                                                                code: str | None) -> None:
    _, api, _ = served
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(**{"model": "main", "messages": ASK, "max_tokens": 2, **change})
    assert refused.value.status_code == 400 and (refused.value.param, refused.value.code) == (param, code)
    assert param in str(refused.value)


def test_parameters_that_ask_for_nothing_are_accepted(served: Any) -> None:
    _, api, _ = served
    completion = api.chat.completions.create(**SAMPLED, n=1, response_format={"type": "text"}, logit_bias={},
                                             frequency_penalty=0)
    assert completion.choices[0].message.content and completion.choices[0].logprobs is None


def test_logprobs_are_the_models_own_in_openais_shape_plain_and_streamed(served: Any) -> None:
    client, api, _ = served
    ask = {**SAMPLED, "logprobs": True, "top_logprobs": 3}
    completion = api.chat.completions.create(**ask)
    answer, content = completion.choices[0].message.content, completion.choices[0].logprobs.content
    assert answer and content and b"".join(bytes(t.bytes) for t in content).decode().strip() == answer
    for token in content:
        tops = [t.logprob for t in token.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and token.logprob <= tops[0] <= 0
        assert token.logprob == pytest.approx(tops[0]) or token.token not in [t.token for t in token.top_logprobs]
    # the model's own: a forward pass over the prompt and the answer's tokens gives the same numbers
    model = service_state(client.app).pool.get("main")
    prompt = model.prompt_ids([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    byte_level = _bytes_to_unicode()  # the tokenizer spells each token's bytes in this alphabet
    answer_ids = model.tokenizer.convert_tokens_to_ids(["".join(byte_level[b] for b in t.bytes) for t in content])
    with torch.inference_mode():
        logits = model.model(torch.tensor([prompt + answer_ids])).logits[0].float().log_softmax(-1)
    expected = [float(logits[len(prompt) - 1 + k, i]) for k, i in enumerate(answer_ids)]
    assert [t.logprob for t in content] == pytest.approx(expected, abs=1e-3)
    assert [t.token for t in content] == [model.tokenizer.decode([i]) for i in answer_ids]

    stop = next(t.token for t in reversed(content) if t.token.strip())  # a stop string: the answer ends before it
    cut = api.chat.completions.create(**ask, stop=[stop]).choices[0]
    assert len(cut.logprobs.content) < len(content) and stop not in cut.message.content
    assert b"".join(bytes(t.bytes) for t in cut.logprobs.content).decode().strip() == cut.message.content

    chunks = list(api.chat.completions.create(**ask, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, pytest.approx(t.logprob)) for t in content]
