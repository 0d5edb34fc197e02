"""The cascade end to end on the tiny model: a specialist's cycle stores its routing index and thresholds in its
generation, and ``"model": "auto"`` sends a prompt of its domain to it and a general one to main, each logged on
the branch that answered; a specialist unsure of its answer defers to its parent line, and one that keeps the request
answers on from the first tokens its check generated.

The lineage (module-scoped, made through the CLI): main's cycle on the Python sample (generation 1), the
specialist ``chem`` forked there for the chemistry domain, its cycle on the chemistry sample (generation 2). The
tiny model's input embeddings are random but fixed, and the prompts of each shared data set follow a few
templates: that is what the router tells apart here (held-out prompts of the scope route at a balanced accuracy
of 0.98 against the foundation's probe and rehearsal prompts and main's held-out Python prompts; see ``GENERAL``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from selftune.daemon.context import Context
from selftune.daemon.http.app import create_app
from selftune.daemon.http.state import service_state
from selftune.daemon.service.cascade import answer_confidence, first_tokens
from selftune.daemon.service.pool import ChampionPool
from selftune.daemon.service.sampling import SamplingParams

from .test_cycle import SAMPLES, cycle, selftune

GENERAL = "Recommend a good book for a long flight."
"""A general prompt in no template of the data. On the tiny model's random embeddings, general questions worded
like the chemistry templates ("What is the capital of France?" against "What is the chemical symbol of ...?")
score above the specialist's threshold: 4 of the 104 probe and rehearsal prompts do (SmolLM2's embeddings route
them right: ``bench/bench_router.py``)."""


@pytest.fixture(scope="module")
def lineage(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, int]:
    """(state, the specialist's generation id)."""
    state = tmp_path_factory.mktemp("cascade") / "state"
    selftune(state, "init", "--foundation", str(tiny_model_dir))
    selftune(state, "ingest", str(SAMPLES / "python_docs.jsonl"))
    assert cycle(state)["status"] == "promoted"
    selftune(state, "branch", "create", "chem", "--from", "1", "--domain", "chemistry")
    selftune(state, "ingest", str(SAMPLES / "chemistry_elements.jsonl"))
    # about routing, not learning: the untrained tiny model need not improve on chemistry
    result = cycle(state, "--branch", "chem", env={"SELFTUNE_GATES__MIN_NEW_DATA_IMPROVEMENT": "-1"})
    assert result["status"] == "promoted", result
    return state, result["generation"]


def manifest(state: Path, generation_id: int) -> dict[str, Any]:
    return json.loads((state / "generations" / str(generation_id) / "generation.json").read_text())


def held_out_prompts(state: Path, generation_id: int) -> list[str]:
    context = Context.open(str(state))
    with context.store.transaction() as tx:
        ids = manifest(state, generation_id)["data"]["held_out_ids"]
        prompts = [tx.interactions.get(i).messages[-2].content for i in ids]
    context.store.engine.dispose()
    return prompts


def surest(state: Path, generation_id: int, prompts: list[str]) -> str:
    """The prompt the generation is most confident answering (as the router measures it)."""
    from selftune.learners import evaluate as ev
    from selftune.learners.chat import generation_prompt_ids

    model, tokenizer = ev.load_model(state / "generations" / str(generation_id))
    confidence = {p: answer_confidence(model, tokenizer, generation_prompt_ids(tokenizer, p), 8) for p in prompts}
    return max(prompts, key=lambda p: confidence[p])


def test_a_specialist_cycle_stores_its_routing_index_and_thresholds(lineage: tuple[Path, int]) -> None:
    from selftune.learners.route_index import RouteIndex

    state, chem = lineage
    routing = manifest(state, chem)["routing"]
    assert routing["enabled"], routing
    assert routing["balanced_accuracy"] >= 0.9 and routing["in_scope"] >= 8
    # out of scope: the foundation's 24 probe and 80 rehearsal prompts, and main's held-out Python prompts
    assert routing["out_of_scope"] > 104 and routing["index_prompts"] >= 16
    assert routing["embedder"] == {"model": "0", "layers": 0, "pooling": "mean", "max_tokens": 64, "dims": 64}
    assert routing["curve"] and all(len(point) == 3 for point in routing["curve"])
    files = manifest(state, chem)["files"]
    assert {"router.faiss", "router.json"} <= set(files)  # under the manifest's checksum
    index = RouteIndex.load(state / "generations" / str(chem))
    assert index.threshold == pytest.approx(routing["threshold"]) and index.count == routing["index_prompts"]
    deferral = routing["deferral"]
    assert deferral["enabled"] and deferral["rows"] >= 8 and deferral["tokens"] == 8 and deferral["budget"] == 0.02
    assert deferral["defer_all"] or math.isfinite(deferral["threshold"])
    assert deferral["specialist_loss"] is None or deferral["specialist_loss"] <= 1.02 * deferral["parent_loss"]
    # the generalist has no scope to route to
    generalist = "the generalist has no scope: it answers what no specialist takes"
    assert manifest(state, 1)["routing"] == {"enabled": False, "reason": generalist}


def test_auto_sends_a_chemistry_prompt_to_the_specialist_and_a_general_one_to_main(
        lineage: tuple[Path, int], token_for: Callable[[Path, str], str], server_process: Callable[..., Any]) -> None:
    state, chem = lineage
    tokens = {scope: token_for(state, scope) for scope in ("ingest", "admin")}
    # A held-out chemistry prompt (never trained on) that the specialist is sure of: routed, not deferred.
    chemistry = surest(state, chem, held_out_prompts(state, chem))
    server = server_process(state).start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=tokens["ingest"], max_retries=0)
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {tokens['admin']}"})
    answered = {}
    for prompt, (branch, generation) in {chemistry: ("chem", chem), GENERAL: ("main", 1)}.items():
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": prompt}], max_tokens=4, temperature=0)
        completion = raw.parse()
        assert (raw.headers["x-selftune-branch"], int(raw.headers["x-selftune-generation"]),
                raw.headers["x-selftune-route"]) == (branch, generation, "routed"), prompt
        assert completion.model == f"{branch}@{generation}"
        assert completion.system_fingerprint == f"generation-{generation}"
        logged = admin.get(f"/v1/interactions/{completion.id}").json()
        assert logged["branch"] == branch and logged["messages"][0]["content"] == prompt
        decision = logged["metadata"]["route"]["decision"]
        assert decision["routed"] is True and decision["branch"] == branch and decision["deferred_from"] == []
        assert set(decision["details"]["scores"]) == {"chem"} and "chem" in decision["details"]["thresholds"]
        answered[branch] = decision
    scores, thresholds = answered["chem"]["details"]["scores"], answered["chem"]["details"]["thresholds"]
    assert scores["chem"] >= thresholds["chem"] and "chem scored" in answered["chem"]["reason"]
    assert "confidence" in answered["chem"]["details"]  # the specialist measured itself, and kept the request
    assert answered["main"]["details"]["scores"]["chem"] < thresholds["chem"]
    assert answered["main"]["reason"].startswith("no specialist in scope")
    metrics = httpx.get(f"{server.url}/metrics").text
    assert f'selftune_model_requests_total{{branch="chem",generation="{chem}",route="routed"}} 1.0' in metrics
    assert "selftune_routing_duration_seconds_count 2.0" in metrics
    assert server.terminate() == 0


def test_an_unsure_specialist_defers_to_its_parent_line_and_routing_can_be_turned_off(
        lineage: tuple[Path, int], token_for: Callable[[Path, str], str]) -> None:
    state, chem = lineage
    headers = {"Authorization": f"Bearer {token_for(state, 'admin')}"}
    chemistry = held_out_prompts(state, chem)[0]
    context = Context.open(str(state))
    app = create_app(context, preload=False)
    router = service_state(app).router
    assert router is not None and service_state(app).pool.models.router is router  # wired in by default
    loaded = router.refresh()
    assert loaded["chem"].generation_id == chem and loaded["chem"].parent_branch == "main"
    router._specialists = {"chem": dataclasses.replace(loaded["chem"], deferral_threshold=math.inf)}  # never sure
    body = {"model": "auto", "messages": [{"role": "user", "content": chemistry}], "max_tokens": 3, "temperature": 0}
    with TestClient(app) as client:
        answered = client.post("/v1/chat/completions", json=body, headers=headers)
        assert (answered.headers["x-selftune-branch"], answered.headers["x-selftune-route"]) == ("main", "deferred")
        logged = client.get(f"/v1/interactions/{answered.json()['id']}", headers=headers).json()
        decision = logged["metadata"]["route"]["decision"]
        assert logged["branch"] == "main" and decision["deferred_from"] == [f"chem@{chem}"]
        assert "chem deferred (confidence" in decision["reason"] and "chem" in decision["details"]["confidence"]
        assert 'selftune_deferrals_total{branch="chem",to="main"} 1.0' in client.get("/metrics").text

        context.config = dataclasses.replace(context.config, routing=dataclasses.replace(context.config.routing,
                                                                                          enabled=False))
        answered = client.post("/v1/chat/completions", json=body, headers=headers)
        assert (answered.headers["x-selftune-branch"], answered.headers["x-selftune-route"]) == ("main", "routed")
        logged = client.get(f"/v1/interactions/{answered.json()['id']}", headers=headers).json()
        decision = logged["metadata"]["route"]["decision"]
        assert (decision["routed"], decision["reason"]) == (False, "routing disabled")
    context.store.engine.dispose()


@pytest.fixture
def sure_specialist(lineage: tuple[Path, int]) -> Any:
    """(app, the chemistry request, the specialist's greedy first tokens for it, and the number of positions of
    each forward pass of the specialist's model), with a specialist that is always sure: it keeps every request."""
    from selftune.learners.chat import end_token_ids

    state, chem = lineage
    context = Context.open(str(state))
    app = create_app(context, preload=False)
    router = service_state(app).router
    assert router is not None
    loaded = router.refresh()
    router._specialists = {"chem": dataclasses.replace(loaded["chem"], deferral_threshold=-math.inf)}
    specialist = service_state(app).pool.get("chem")
    messages = [{"role": "user", "content": held_out_prompts(state, chem)[0]}]
    check = first_tokens(specialist.model, specialist.tokenizer, specialist.prompt_ids(messages),
                         context.config.routing.deferral_tokens)
    assert len(check.tokens) == 8 and check.tokens[-1] not in end_token_ids(specialist.model, specialist.tokenizer)
    positions: list[int] = []
    hook = specialist.model.register_forward_pre_hook(
        lambda _module, _args, kwargs: positions.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    yield app, messages, specialist.tokenizer.decode(check.tokens, skip_special_tokens=True).lstrip(), positions
    hook.remove()
    context.store.engine.dispose()


def test_a_kept_request_answers_on_from_the_deferral_checks_tokens_plain_and_streamed(
        sure_specialist: Any, lineage: tuple[Path, int], token_for: Callable[[Path, str], str]) -> None:
    app, messages, check, positions = sure_specialist
    headers = {"Authorization": f"Bearer {token_for(lineage[0], 'admin')}"}
    # sampled: an answer generated afresh would not start with the check's greedy tokens
    body = {"model": "auto", "messages": messages, "max_tokens": 12, "temperature": 1.0, "seed": 3}
    with TestClient(app) as client:
        answered = client.post("/v1/chat/completions", json=body, headers=headers).json()
        text, usage = answered["choices"][0]["message"]["content"], answered["usage"]
        assert answered["model"].startswith("chem@") and text.startswith(check) and len(text) > len(check)
        assert usage["completion_tokens"] == 12 and answered["choices"][0]["finish_reason"] == "length"
        # each answer token generated once, the prompt read once: the check's forwards and its KV cache are reused
        assert len(positions) == 12 and sum(positions) == usage["prompt_tokens"] + 12 - 1
        logged = client.get(f"/v1/interactions/{answered['id']}", headers=headers).json()
        assert logged["messages"][-1]["content"] == text and logged["branch"] == "chem"

        positions.clear()
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", "/v1/chat/completions", json=streamed, headers=headers) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        pieces = [e["choices"][0]["delta"]["content"] for e in events if e["choices"][0]["delta"].get("content")]
        assert pieces[0].startswith(check) and len(pieces) > 1  # the check's tokens first, then the rest
        assert events[-1]["usage"]["completion_tokens"] == 12 and len(positions) == 12
        logged = client.get(f"/v1/interactions/{events[-1]['interaction_id']}", headers=headers).json()
        assert logged["messages"][-1]["content"] == "".join(pieces)


def test_max_tokens_and_stop_strings_bound_the_whole_answer_the_checks_tokens_included(
        sure_specialist: Any, lineage: tuple[Path, int], token_for: Callable[[Path, str], str]) -> None:
    app, messages, check, positions = sure_specialist
    headers = {"Authorization": f"Bearer {token_for(lineage[0], 'admin')}"}
    body = {"model": "auto", "messages": messages, "max_tokens": 16, "temperature": 1.0, "seed": 3}

    def answer(**changes: Any) -> dict[str, Any]:
        positions.clear()
        return client.post("/v1/chat/completions", json={**body, **changes}, headers=headers).json()["choices"][0]

    with TestClient(app) as client:
        whole = answer()["message"]["content"]
        short = answer(max_tokens=3)  # fewer than the check's 8: the answer is the check's first 3
        assert short["finish_reason"] == "length" and check.startswith(short["message"]["content"])
        assert len(positions) == 8  # the check's forwards only
        rest = whole[len(check):]  # sampled: the same seed samples the same rest
        stop = rest[len(rest) // 3:][:3]
        assert whole.index(stop) > len(check)
        stopped = answer(stop=stop)
        assert (stopped["message"]["content"], stopped["finish_reason"]) == (whole[:whole.index(stop)], "stop")
        assert 8 < len(positions) < 16  # generation stopped at the stop string, past the check's tokens


def test_a_draft_is_answered_on_only_by_the_generation_that_made_it_for_that_prompt(lineage: tuple[Path, int]) -> None:
    state, chem = lineage
    context = Context.open(str(state))
    specialist = ChampionPool(context).get("chem")
    prompt = specialist.prompt_ids([{"role": "user", "content": GENERAL}])
    draft = dataclasses.replace(first_tokens(specialist.model, specialist.tokenizer, prompt, 4), generation_id=chem)
    params = SamplingParams(max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=0, seed=3)
    fresh = specialist.generate(prompt, params).text  # sampled
    greedy = specialist.tokenizer.decode(draft.tokens, skip_special_tokens=True).lstrip()
    assert specialist.generate(prompt, params, draft=draft).text == greedy != fresh
    # a champion that moved since the check, or a draft of another prompt: the answer starts afresh
    for other in (dataclasses.replace(draft, generation_id=1), dataclasses.replace(draft, prompt_ids=prompt[:-1])):
        assert specialist.generate(prompt, params, draft=other).text == fresh
    context.store.engine.dispose()
