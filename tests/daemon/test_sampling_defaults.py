"""A chat that does not say how to sample samples as the answering generation's generation_config.json says,
else as [server] says (vLLM's order); generation 0 of the embedded model gets SmolLM2's own settings."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from selftune.daemon.context import Context
from selftune.daemon.http.app import create_app

from .conftest import init_state
from .test_api import wait_ready

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@contextmanager
def chatting(state: Path, token_for: Callable[[Path, str], str]) -> Iterator[Callable[..., str]]:
    """``chat(**request)``: the answer of the state's champion, in-process."""
    headers = {"Authorization": f"Bearer {token_for(state, 'ingest')}"}
    context = Context.open(str(state))
    with TestClient(create_app(context), raise_server_exceptions=False) as client:
        wait_ready(client)

        def chat(**request: Any) -> str:
            body = {"model": "main", "messages": PROMPT, "max_tokens": 6, **request}
            response = client.post("/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        yield chat
    context.store.engine.dispose()


def test_the_generations_own_settings_come_before_the_servers(tmp_path: Path, tiny_model_dir: Path,
                                                                token_for: Callable[[Path, str], str]) -> None:
    foundation = tmp_path / "greedy-foundation"
    shutil.copytree(tiny_model_dir, foundation)
    settings = foundation / "generation_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "do_sample": False}))
    state = init_state(tmp_path / "state", foundation, "[schedule]\nenabled = false\n")  # [server] samples (0.7)
    assert json.loads((state / "generations" / "0" / "generation_config.json").read_text())["do_sample"] is False
    with chatting(state, token_for) as chat:
        unsaid = [chat(seed=1), chat(seed=2)]
        greedy = chat(temperature=0)  # empty: the tiny model's greedy answer is newlines, which answers leave out
        as_the_server_says = chat(temperature=0.7, top_p=0.9, seed=1)
        sampled = {chat(temperature=1.0, seed=seed) for seed in (1, 2)}
    assert unsaid == [greedy, greedy]  # the file says greedy, whatever the seed
    assert as_the_server_says != greedy  # ... so [server]'s default sampling was not used
    assert len(sampled) == 2 and greedy not in sampled  # and what a request says still comes first


def test_the_servers_settings_apply_when_the_generation_says_nothing(make_state: Callable[..., Path],
                                                                    token_for: Callable[[Path, str], str]) -> None:
    state = make_state("[schedule]\nenabled = false\n[server]\ndefault_temperature = 0\n")
    own = json.loads((state / "generations" / "0" / "generation_config.json").read_text())
    assert not {"do_sample", "temperature", "top_p", "top_k"} & own.keys()
    with chatting(state, token_for) as chat:
        unsaid = [chat(seed=1), chat(seed=2)]
        greedy = chat(temperature=0)
        sampled = chat(temperature=1.0, seed=1)
    assert unsaid == [greedy, greedy] and sampled != greedy


@pytest.mark.parametrize(("setting", "value"), [("default_temperature", 3), ("default_top_p", 0),
                                                ("default_top_k", -1)])
def test_bad_server_sampling_settings_are_named(setting: str, value: float) -> None:
    from dataclasses import replace

    from selftune.policies.config import ServerConfig

    problems = replace(ServerConfig(), **{setting: value}).problems()
    assert len(problems) == 1 and problems[0].startswith(f"server.{setting} = {value}: use")


@pytest.mark.slow
def test_embedded_generation_zero_samples_as_smollm2s_card_says(tmp_path: Path) -> None:
    from selftune.learners.foundation import materialise

    materialise("embedded", tmp_path / "gen0")
    settings = json.loads((tmp_path / "gen0" / "generation_config.json").read_text())
    assert (settings["do_sample"], settings["temperature"], settings["top_p"]) == (True, 0.2, 0.9)
