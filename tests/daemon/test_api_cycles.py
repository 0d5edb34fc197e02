"""GET /v1/cycles: the cycles of a real state (SQLite), newest first, filtered and paged, over the real app."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from selftune.daemon.context import Context
from selftune.daemon.http.app import create_app
from selftune.daemon.lineage import create_branch

from .conftest import record_finished_cycle


@pytest.fixture(scope="module")
def api(make_state: Callable[..., Path], token_for: Callable[[Path, str], str]) -> Iterator[TestClient]:
    """Cycles 1-4: main promoted, main rejected, chem skipped, main failed."""
    state = make_state()
    context = Context.open(str(state))
    create_branch(context, "chem", 0, ["chemistry"])
    for branch, outcome in (("main", "promoted"), ("main", "rejected"), ("chem", "skipped"), ("main", "failed")):
        record_finished_cycle(context, branch, outcome)
    admin = {"Authorization": f"Bearer {token_for(state, 'admin')}"}
    with TestClient(create_app(context, preload=False), headers=admin, raise_server_exceptions=False) as client:
        yield client
    context.store.engine.dispose()


def test_cycles_are_listed_newest_first_filtered_and_paged(api: TestClient) -> None:
    listed = api.get("/v1/cycles")
    assert listed.status_code == 200, listed.text
    rows = listed.json()["data"]
    assert [(r["cycle"], r["branch"], r["status"]) for r in rows] == [
        (4, "main", "failed"), (3, "chem", "skipped"), (2, "main", "rejected"), (1, "main", "promoted")]
    assert rows[0]["error"] == "the worker failed" and rows[0]["finished_at"] and rows[0]["parent"] == 0
    assert listed.json()["next_before"] is None
    assert [r["cycle"] for r in api.get("/v1/cycles", params={"branch": "main"}).json()["data"]] == [4, 2, 1]
    assert [r["cycle"] for r in api.get("/v1/cycles", params={"status": "rejected"}).json()["data"]] == [2]

    first = api.get("/v1/cycles", params={"limit": 2}).json()
    assert [r["cycle"] for r in first["data"]] == [4, 3] and first["next_before"] == 3
    second = api.get("/v1/cycles", params={"limit": 2, "before": first["next_before"]}).json()
    assert [r["cycle"] for r in second["data"]] == [2, 1] and second["next_before"] is None

    # the list and the cycle's own page agree
    assert {k: v for k, v in api.get("/v1/cycles/2").json().items() if k in rows[2]} == rows[2]


def test_bad_listing_parameters_are_named_and_unauthorised_callers_refused(api: TestClient) -> None:
    unknown = api.get("/v1/cycles", params={"branch": "nope"})
    assert unknown.status_code == 404 and "branch 'nope' does not exist" in unknown.json()["detail"]
    for params, field in (({"status": "done"}, "status"), ({"limit": 0}, "limit"), ({"before": "x"}, "before")):
        bad = api.get("/v1/cycles", params=params)
        assert bad.status_code == 422 and field in [e["field"] for e in bad.json()["errors"]], (params, bad.text)
    assert api.get("/v1/cycles", headers={"Authorization": ""}).status_code == 401
