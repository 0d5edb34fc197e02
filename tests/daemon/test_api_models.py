"""Model names at serving time: pinning each form, "auto" and the router seam, /v1/models, provenance on every
response, the exchange logged on the branch that answered, and the pool's bound on loaded generations.

The lineage (tiny models, each generation its own weights): main 0 -> 1 (champion) -> 2 (challenger) and 3
(failed, no files); the specialist ``jargon`` forked at 1, its champion 4.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from selftune.policies.records import CHALLENGER, CHAMPION

from selftune.daemon.context import Context
from selftune.daemon.http.app import create_app
from selftune.daemon.http.state import service_state
from selftune.daemon.lineage import create_branch
from selftune.daemon.service.models import Decision, ModelNotFoundError, Models
from selftune.daemon.service.pool import ChampionPool

PINS = {  # name -> (branch that answers, generation, alias)
    "main": ("main", 1, CHAMPION), "main@champion": ("main", 1, CHAMPION), "main@challenger": ("main", 2, CHALLENGER),
    "main@0": ("main", 0, None), "main@2": ("main", 2, None), "jargon": ("jargon", 4, CHAMPION),
    "jargon@1": ("jargon", 1, None), "jargon@champion": ("jargon", 4, CHAMPION),
}
NAMES = ["main", "main@champion", "main@challenger", "main@0", "main@1", "main@2",
         "jargon", "jargon@champion", "jargon@1", "jargon@4", "auto"]
"""What GET /v1/models lists, in its order (the default branch first; generation 3 failed: not listed)."""
ASK = [{"role": "user", "content": "What does grok mean?"}]


def add_generation(context: Context, source: Path, generation_id: int, branch: str, parent: int, status: str,
                   alias: str | None = None) -> None:
    """A generation with weights of its own (``source``'s, shifted by seeded noise); a failed one has no files."""
    import torch
    from safetensors.torch import load_file, save_file

    def fill(directory: Path) -> dict[str, Any]:
        shutil.copytree(source, directory, dirs_exist_ok=True)
        weights = load_file(directory / "model.safetensors")
        noise = torch.Generator().manual_seed(generation_id)
        save_file({k: v + 0.5 * torch.randn(v.shape, generator=noise) for k, v in weights.items()},
                  directory / "model.safetensors", metadata={"format": "pt"})
        return {"params": sum(v.numel() for v in weights.values())}

    path, checksum, params = str(context.artifacts.root / str(generation_id)), "-", 0
    if status != "failed":
        context.artifacts.write(generation_id, fill, {"parent": parent, "branch": branch})
        manifest = context.artifacts.verify(generation_id)
        checksum, params = manifest["checksum"], manifest["params"]
    with context.store.transaction(write=True) as tx:
        tx.generations.add(branch, path, checksum, params, parent_id=parent, status=status, id=generation_id)
        if alias is not None:
            tx.aliases.set(branch, alias, generation_id)


@pytest.fixture(scope="module")
def state(make_state: Callable[..., Path], tiny_model_dir: Path) -> Path:
    state = make_state("[schedule]\nenabled = false\n")
    context = Context.open(str(state))
    add_generation(context, tiny_model_dir, 1, "main", 0, "promoted", CHAMPION)
    add_generation(context, tiny_model_dir, 2, "main", 1, "candidate", CHALLENGER)
    add_generation(context, tiny_model_dir, 3, "main", 1, "failed")
    create_branch(context, "jargon", 1, ["hacker_jargon"])
    add_generation(context, tiny_model_dir, 4, "jargon", 1, "promoted", CHAMPION)
    context.store.engine.dispose()
    return state


@pytest.fixture(scope="module")
def tokens(state: Path, token_for: Callable[[Path, str], str]) -> dict[str, str]:
    return {scope: token_for(state, scope) for scope in ("ingest", "admin")}


def chat(client: openai.OpenAI, model: str, **options: Any) -> tuple[Any, httpx.Headers]:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=ASK, max_tokens=6, temperature=0.8,
                                                           seed=3, **options)
    return raw.parse(), raw.headers


def provenance(headers: Mapping[str, str]) -> tuple[str, int, str]:
    return headers["x-selftune-branch"], int(headers["x-selftune-generation"]), headers["x-selftune-route"]


def test_each_name_answers_from_its_generation_and_is_logged_on_its_branch(
        state: Path, tokens: dict[str, str], server_process: Callable[..., Any]) -> None:
    server = server_process(state).start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=tokens["ingest"], max_retries=0)
    admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {tokens['admin']}"})
    answers: dict[int, set[str]] = {}
    for name, (branch, generation, alias) in PINS.items():
        completion, headers = chat(client, name)
        assert provenance(headers) == (branch, generation, "pinned"), name
        assert (completion.model, completion.system_fingerprint) == (f"{branch}@{generation}",
                                                                     f"generation-{generation}"), name
        logged = admin.get(f"/v1/interactions/{completion.id}").json()
        assert logged["branch"] == branch and logged["metadata"]["generation"] == generation, name
        assert logged["metadata"]["route"] == {"requested": name, "model": f"{branch}@{generation}", "branch": branch,
                                               "generation": generation, "alias": alias, "kind": "pinned",
                                               "decision": None}, name
        answers.setdefault(generation, set()).add(completion.choices[0].message.content)
    assert all(len(texts) == 1 for texts in answers.values()), answers  # one seed: one generation, one answer
    assert answers[0] != answers[1]  # ... and other weights, another

    completion, headers = chat(client, "auto")  # no router configured: the default branch's champion
    assert provenance(headers) == ("main", 1, "routed") and completion.model == "main@1"
    route = admin.get(f"/v1/interactions/{completion.id}").json()["metadata"]["route"]
    assert (route["requested"], route["kind"], route["alias"]) == ("auto", "routed", CHAMPION)
    assert {k: route["decision"][k] for k in ("branch", "generation", "routed", "reason", "deferred_from")} == {
        "branch": "main", "generation": None, "routed": False, "reason": "no router", "deferred_from": []}

    stream = client.chat.completions.create(model="jargon@1", messages=ASK, max_tokens=6, temperature=0.8, seed=3,
                                            stream=True)
    assert provenance(stream.response.headers) == ("jargon", 1, "pinned")  # before the first token
    chunks = list(stream)
    assert {(c.model, c.system_fingerprint) for c in chunks} == {("jargon@1", "generation-1")}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) in answers[1]
    logged = admin.get(f"/v1/interactions/{chunks[-1].model_extra['interaction_id']}").json()
    assert logged["branch"] == "jargon" and logged["metadata"]["route"]["requested"] == "jargon@1"

    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'selftune_model_requests_total{branch="jargon",generation="1",route="pinned"} 2.0' in metrics
    assert 'selftune_model_requests_total{branch="main",generation="1",route="routed"} 1.0' in metrics
    assert "selftune_routing_duration_seconds_count 1.0" in metrics
    assert server.terminate() == 0


def test_models_lists_every_name_and_unknown_names_are_404_naming_what_exists(
        state: Path, tokens: dict[str, str], server_process: Callable[..., Any]) -> None:
    server = server_process(state).start()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=tokens["ingest"], max_retries=0)
    models = client.models.list().data
    assert [m.id for m in models] == NAMES
    by_name = {m.id: m for m in models}
    assert {k: by_name["main@challenger"].model_extra[k] for k in ("branch", "generation", "alias", "status")} == {
        "branch": "main", "generation": 2, "alias": CHALLENGER, "status": "candidate"}
    assert (by_name["jargon"].model_extra["generation"], by_name["auto"].model_extra["generation"]) == (4, None)
    assert all(m.object == "model" and m.owned_by == "selftune" and m.created > 0 for m in models)
    assert client.models.retrieve("jargon@1").model_extra["generation"] == 1

    unknown = {  # name -> what the message says, and the names it lists
        "nope": ("no branch 'nope'", ["main", "jargon", "auto"]),
        "main@latest": ("'latest' after '@' is neither an alias", NAMES[:6]),
        "main@3": ("generation 3 failed", NAMES[:6]),
        "main@99": ("no generation 99 on branch 'main'", NAMES[:6]),
        "jargon@0": ("no generation 0 on branch 'jargon' (it is main@0)", NAMES[6:10]),
        "jargon@challenger": ("branch 'jargon' has no challenger now", NAMES[6:10]),
    }
    for name, (problem, known) in unknown.items():
        with pytest.raises(openai.NotFoundError) as raised:
            client.chat.completions.create(model=name, messages=ASK, max_tokens=2)
        assert raised.value.code == "model_not_found" and raised.value.param == "model", name
        assert problem in raised.value.message and name in raised.value.message, raised.value.message
        body = raised.value.response.json()
        assert body["models"] == known and body["errors"][0]["field"] == "model", body
        assert raised.value.response.headers["content-type"] == "application/problem+json"
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("main@42")
    assert raised.value.code == "model_not_found"
    assert server.terminate() == 0


class Deferring:
    """A router that sends every request to ``jargon``, which passes it up to ``main``."""

    def __init__(self) -> None:
        self.seen: list[Sequence[Mapping[str, str]]] = []

    def choose(self, messages: Sequence[Mapping[str, str]]) -> Decision:
        self.seen.append(messages)
        return Decision("main", deferred_from=("jargon@4",), reason="low confidence", details={"confidence": 0.2})


class Broken:
    def choose(self, messages: Sequence[Mapping[str, str]]) -> Decision:
        raise RuntimeError("index missing")


def test_a_router_wired_in_decides_auto_and_its_decision_is_logged(state: Path, tokens: dict[str, str]) -> None:
    context = Context.open(str(state))
    app = create_app(context, preload=False)
    router = Deferring()
    service_state(app).pool.models.router = router  # the one line that wires a router in
    headers = {"Authorization": f"Bearer {tokens['admin']}"}
    with TestClient(app) as client:
        body = {"model": "auto", "messages": ASK, "max_tokens": 3, "temperature": 0, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            assert provenance(response.headers) == ("main", 1, "deferred")
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
        assert router.seen == [ASK]
        route = client.get(f"/v1/interactions/{events[-1]['interaction_id']}", headers=headers).json()["metadata"]["route"]
        assert route["kind"] == "deferred" and route["decision"]["deferred_from"] == ["jargon@4"]
        assert route["decision"]["details"] == {"confidence": 0.2} and route["decision"]["routed"] is True
        assert 'selftune_deferrals_total{branch="jargon",to="main"} 1.0' in client.get("/metrics").text

        service_state(app).pool.models.router = Broken()  # a failing router: the default champion answers
        answered = client.post("/v1/chat/completions", json={**body, "stream": False}, headers=headers)
        assert provenance(answered.headers) == ("main", 1, "routed")
        route = client.get(f"/v1/interactions/{answered.json()['id']}", headers=headers).json()["metadata"]["route"]
        assert route["decision"]["routed"] is False and route["decision"]["reason"] == "router failed: RuntimeError"
    context.store.engine.dispose()


def test_the_pool_keeps_the_champions_and_at_most_max_pinned_others(state: Path) -> None:
    context = Context.open(str(state))
    pool = ChampionPool(context, max_pinned=1)
    assert pool.get("main").generation_id == 1
    for name in ("main@0", "main@challenger", "jargon"):
        pool.serve(name)
    assert pool.loaded() == {"main": 1, "jargon": 4} and pool.pinned() == [2]  # 0 went first
    target, model = pool.serve("main@0")
    assert model.generation_id == 0 and pool.pinned() == [0]
    assert pool.serve("jargon@4")[1] is pool.current("jargon")  # a pin of a champion shares its model
    with pytest.raises(ModelNotFoundError):
        Models(context).pin("auto")  # export and other pins: "auto" is no generation
    context.store.engine.dispose()
