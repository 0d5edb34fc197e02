"""Secrets stay private: the state directory and its database are the service user's alone, whatever the
umask, and a token in a URL counts only where a browser signs in, and only once it was checked."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from selftune.daemon.context import Context
from selftune.daemon.http.app import create_app

from .test_api import assert_problem
from .test_api_errors import bare_state


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("first", ["write_default_config", "store"])
def test_the_state_directory_is_0700_and_its_database_0600_whatever_the_umask(tmp_path: Path, first: str) -> None:
    state = tmp_path / "home" / "state"
    previous = os.umask(0o022)  # the usual umask outside systemd: 0755 directories, 0644 files
    try:
        context = Context.open(str(state))
        if first == "write_default_config":  # as `selftune init` begins
            context.write_default_config()
        with context.store.transaction(write=True) as tx:
            tx.tokens.create("test", "admin")
        context.artifacts  # noqa: B018 - creates the generations directory
    finally:
        os.umask(previous)
    assert mode(state) == 0o700
    assert {p.name: mode(p) for p in state.glob("selftune.db*")} == {
        "selftune.db": 0o600, "selftune.db-wal": 0o600, "selftune.db-shm": 0o600}
    context.store.engine.dispose()


@pytest.fixture
def signed(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    """A client of its own (its own cookies) and an admin token's secret."""
    context, headers = bare_state(tmp_path / "state")
    with TestClient(create_app(context, preload=False)) as client:
        yield client, headers["Authorization"].removeprefix("Bearer ")
    context.store.engine.dispose()


@pytest.mark.parametrize("path", ["/v1/generations", "/v1/interactions", "/v1/models", "/v1/generations/0/report"])
def test_a_token_in_the_url_counts_nowhere_but_on_the_sign_in_page(signed: tuple[TestClient, str], path: str) -> None:
    client, secret = signed
    body = assert_problem(client.get(f"{path}?token={secret}"), 401)
    assert "Authorization: Bearer" in body["detail"]
    assert client.get(f"/v1/lineage?token={secret}", follow_redirects=False).status_code == 303  # signs in
    assert client.get(path).status_code != 401  # with the cookie that set


def test_the_cookie_is_set_only_from_a_token_that_was_checked(signed: tuple[TestClient, str]) -> None:
    client, secret = signed
    page = client.get("/v1/lineage?token=garbage", headers={"Authorization": f"Bearer {secret}"},
                      follow_redirects=False)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "set-cookie" not in page.headers and not client.cookies
    assert_problem(client.get("/v1/lineage"), 401)  # no cookie was kept either
    assert_problem(client.get("/v1/lineage?token=garbage"), 401)
