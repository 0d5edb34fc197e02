"""What the API's routes share, typed: one ``ServiceState`` per app, reached through ``StateDep``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import anyio
from fastapi import Depends, FastAPI, Request

from selftune.daemon.context import Context
from selftune.daemon.service.cascade import CascadeRouter
from selftune.daemon.service.metrics import Metrics
from selftune.daemon.service.pool import ChampionPool


@dataclass
class ServiceState:
    """The running service as the API sees it."""

    context: Context
    pool: ChampionPool
    """The loaded champions, one per branch asked for."""
    metrics: Metrics
    router: CascadeRouter | None = None
    """Routes ``"model": "auto"`` (wired into ``pool.models``); it follows ``routing.enabled`` per request."""
    accepting: bool = True
    """False once the service stops: new writes are refused (``Draining``)."""
    preload_error: str | None = None
    """Why the default branch's champion could not be loaded yet (``/readyz`` says it)."""
    generation_limiter: anyio.CapacityLimiter = field(init=False)
    """Threads for generation; made by the app's lifespan, inside the event loop it belongs to."""

    @classmethod
    def build(cls, context: Context) -> ServiceState:
        """The one place the service's metrics, champion pool and router are made (the service and the tests'
        apps). The cascade's router is always wired in: with ``routing.enabled`` off (a reload may turn it on or
        off) it sends ``"auto"`` to the default branch, as it does while no specialist has a routing index."""
        metrics = Metrics(context)
        pool = ChampionPool(context, metrics, threads=context.config.model.threads)
        router = CascadeRouter(context, pool)
        pool.models.router = router
        return cls(context, pool, metrics, router)


def service_state(app: FastAPI) -> ServiceState:
    """The state ``create_app`` stored on the app."""
    state: ServiceState = app.state.service
    return state


def get_state(request: Request) -> ServiceState:
    return service_state(request.app)


StateDep = Annotated[ServiceState, Depends(get_state)]
"""A route parameter ``state: StateDep`` receives the app's ``ServiceState``."""
