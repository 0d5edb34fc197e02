"""Health and metrics: open endpoints (no token), for systemd, load balancers and Prometheus."""

from __future__ import annotations

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from selftune.daemon.http.errors import problem_response
from selftune.daemon.http.state import ServiceState, StateDep
from selftune.daemon.service.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


def readiness(state: ServiceState) -> list[str]:
    """What keeps the service from being ready; empty when the database answers and a champion is loaded.
    Blocking (a database round trip): call it in a thread."""
    problems = []
    context = state.context
    try:
        context.store.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", said in words
        problems.append(f"database unreachable: {type(exc).__name__}")
    branch = context.config.ingest.default_branch
    if state.pool.current(branch) is None:
        reason = state.preload_error or "still loading"
        problems.append(f"no champion loaded for branch {branch!r} ({reason})")
    return problems


@router.get("/livez", summary="The process answers")
async def livez() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database answers and a champion is loaded",
            responses={503: {"description": "Not ready; `detail` says why."}})
async def readyz(state: StateDep) -> Response:
    problems = await anyio.to_thread.run_sync(readiness, state)
    state.metrics.ready.set(0 if problems else 1)
    if problems:
        return problem_response(503, "; ".join(problems), None, "/readyz")
    return JSONResponse({"status": "ready", "champions": state.pool.loaded()})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics_endpoint(state: StateDep) -> Response:
    # in a thread: the cycle outcomes are read from the database
    return Response(await anyio.to_thread.run_sync(state.metrics.exposition), media_type=CONTENT_TYPE)
