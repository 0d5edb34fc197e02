"""Cycles: list them, start one on a branch (returns at once), read one, cancel one (admin only)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Path, Query

from selftune.daemon import views
from selftune.daemon.cycle.control import cancel_cycle, start_cycle
from selftune.daemon.http.auth import Admin
from selftune.daemon.http.schemas import CycleRequest, Text
from selftune.daemon.http.state import StateDep

CycleId = Annotated[int, Path(ge=1, le=2**31)]
CycleStatus = Literal["running", "promoted", "candidate", "rejected", "skipped", "failed", "cancelled"]

router = APIRouter(tags=["cycles"])


@router.get("/v1/cycles", summary="Cycles, newest first (keyset pagination)",
            description="Each row is a cycle without its steps and gates (GET /v1/cycles/{cycle_id} has them); "
                        "`next_before` is set while there may be more.")
async def list_cycles(
    state: StateDep, token: Admin,
    branch: Annotated[Text | None, Query(max_length=64)] = None,
    status: CycleStatus | None = None,
    before: Annotated[int | None, Query(ge=1, le=2**31, description="Only ids below this: pass `next_before`.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.context.store.transaction() as tx:
            if branch is not None:
                tx.branches.get(branch)  # a 404 naming an unknown branch, rather than an empty list
            cycles = tx.cycles.list(branch=branch)
        rows = [views.cycle_summary(c) for c in reversed(cycles) if before is None or c.id < before]
        rows = [r for r in rows if status is None or r["status"] == status]
        data = rows[:limit]
        return {"data": data, "next_before": data[-1]["cycle"] if len(rows) > limit else None}

    return await anyio.to_thread.run_sync(read)


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
