"""Cycles: start one on a branch (returns at once), read one, cancel one (admin only)."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Path

from selftune.daemon import views
from selftune.daemon.cycle.control import cancel_cycle, start_cycle
from selftune.daemon.http.auth import Admin
from selftune.daemon.http.schemas import CycleRequest
from selftune.daemon.http.state import StateDep

CycleId = Annotated[int, Path(ge=1, le=2**31)]

router = APIRouter(tags=["cycles"])


@router.post("/v1/cycles", status_code=202,
             summary="Start a cycle on a branch (returns at once; 409 if one is running)")
async def start(state: StateDep, token: Admin, body: CycleRequest | None = None) -> dict[str, Any]:
    context = state.context
    branch = (body.branch if body else None) or context.config.ingest.default_branch
    cycle = await anyio.to_thread.run_sync(start_cycle, context, branch, "api")
    state.metrics.cycles_started.labels(branch, "api").inc()
    return await anyio.to_thread.run_sync(views.cycle_view, context, cycle.id)


@router.get("/v1/cycles/{cycle_id}", summary="A cycle: its state, steps and gates")
async def get(state: StateDep, token: Admin, cycle_id: CycleId) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(views.cycle_view, state.context, cycle_id)


@router.delete("/v1/cycles/{cycle_id}", status_code=202,
               summary="Cancel a running cycle (its training checkpoints and stops)")
async def cancel(state: StateDep, token: Admin, cycle_id: CycleId) -> dict[str, Any]:
    await anyio.to_thread.run_sync(cancel_cycle, state.context, cycle_id)
    return await anyio.to_thread.run_sync(views.cycle_view, state.context, cycle_id)
