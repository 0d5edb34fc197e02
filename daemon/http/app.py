"""The HTTP API (FastAPI): ingest, feedback, OpenAI-compatible chat, generations, cycles, health, metrics.

``create_app(context)`` builds it; ``selftune serve`` runs it under uvicorn beside the scheduler.
The rooms: ``routers/`` (one per resource), ``auth`` (tokens and scopes), ``errors`` (problem+json),
``middleware`` (body limit, metrics, draining, the 500), ``schemas`` (the documented bodies), ``state`` (what
the routes share, typed).

- Errors are RFC 9457 ``application/problem+json`` documents whose ``errors`` name each bad field.
- Bodies are bounded (``server.max_body_bytes``, ``server.max_batch_rows``); a batch with one bad row
  is refused whole, so nothing of a refused request is ever written.
- Blocking work (database, torch) runs in worker threads: the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from selftune.daemon.context import Context
from selftune.daemon.http.errors import install_problem_handlers
from selftune.daemon.http.middleware import BodyLimit, Draining, RequestMetrics, UnexpectedErrors
from selftune.daemon.http.routers import chat, cycles, generations, health, interactions
from selftune.daemon.http.schemas import BODY_COMPONENTS
from selftune.daemon.http.state import ServiceState

log = logging.getLogger(__name__)
GENERATION_THREADS = 2
"""Chat completions generating at once; the others wait for a thread (see ``chat.MAX_WAITING_GENERATIONS``)."""
PRELOAD_RETRY_SECONDS = 10
ROUTERS = (health.router, interactions.router, chat.router, generations.models_router, generations.router, cycles.router)


def create_app(context: Context, *, state: ServiceState | None = None, preload: bool = True) -> FastAPI:
    """The API over ``context``. ``state`` is the service's (its metrics and champion pool, which the
    service shares with its scheduler); by default one is built here. ``preload`` loads the default
    branch's champion at startup (in the background: /readyz answers 503 until it is loaded)."""
    if state is None:
        state = ServiceState.build(context)
    elif state.context is not context:
        raise ValueError("create_app: the state was built over another context; pass state.context as context")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.generation_limiter = anyio.CapacityLimiter(GENERATION_THREADS)  # bound to this event loop
        loader = asyncio.create_task(_preload(state)) if preload else None
        yield
        if loader is not None and not loader.done():
            loader.cancel()

    # /docs and /redoc load Swagger UI and ReDoc from the fastapi-offline wheel, not from a CDN: they work offline.
    app = FastAPIOffline(title="selftune", version="1", lifespan=lifespan,
                         description="A continual self-tuning daemon for small language models. Errors are "
                                     "application/problem+json documents whose `errors` name the bad fields.")
    app.state.service = state
    install_problem_handlers(app)
    app.add_middleware(BodyLimit, context=context)
    app.add_middleware(RequestMetrics, metrics=state.metrics)
    app.add_middleware(Draining, state=state)
    app.add_middleware(UnexpectedErrors)  # added last: the outermost
    for router in ROUTERS:
        app.include_router(router)
    _document_bodies(app)
    return app


def _document_bodies(app: FastAPI) -> None:
    """Add the schemas of the bodies that routes read themselves (ingest, feedback) to the OpenAPI components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            generate().setdefault("components", {}).setdefault("schemas", {}).update(BODY_COMPONENTS)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


async def _preload(state: ServiceState) -> None:
    """Load the default branch's champion; on failure say why in /readyz and try again every little while."""
    while True:
        branch = state.context.config.ingest.default_branch
        try:
            await anyio.to_thread.run_sync(state.pool.get, branch)
            state.preload_error = None
            return
        except Exception as exc:  # noqa: BLE001 - reported by /readyz; serving goes on without it
            state.preload_error = f"{type(exc).__name__}: {exc}"
            log.error("could not load the champion of branch %s (retrying in %s s): %s", branch,
                      PRELOAD_RETRY_SECONDS, exc)
        await asyncio.sleep(PRELOAD_RETRY_SECONDS)


def openapi_json(context: Context) -> str:
    """The OpenAPI document (for docs and fuzzing), without starting anything."""
    return json.dumps(create_app(context, preload=False).openapi(), indent=1)
