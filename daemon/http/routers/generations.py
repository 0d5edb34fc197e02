"""Generations and their names: the OpenAI model list (each name a chat completion's ``model`` takes), and
(admin only) list, detail, the lineage page, reports, and promotion."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Path, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from selftune.daemon import views
from selftune.daemon.http.auth import Admin, AdminSignIn, Ingest, sign_in_token, signed_in_redirect
from selftune.daemon.http.errors import Problem
from selftune.daemon.http.state import StateDep
from selftune.daemon.lineage import promote as promote_generation
from selftune.daemon.reports.files import REPORT_FILES, report_file
from selftune.daemon.reports.lineage import lineage_rows, render_lineage_html
from selftune.daemon.service.models import ModelEntry, ModelNotFoundError

log = logging.getLogger(__name__)
GenerationId = Annotated[int, Path(ge=0, le=2**31)]
MODEL_NOT_FOUND = "model_not_found"
"""OpenAI's error code for a model that does not exist."""

router = APIRouter(tags=["generations"])
models_router = APIRouter(tags=["models"])
"""OpenAI's model list: its own tag in /docs (a route's tags add to its router's)."""


def model_object(entry: ModelEntry) -> dict[str, Any]:
    """A name in OpenAI's model shape, with what it answers with now (``generation`` is null for "auto")."""
    return {"id": entry.name, "object": "model", "created": int(entry.created.timestamp()) if entry.created else 0,
            "owned_by": "selftune", "branch": entry.branch, "generation": entry.generation_id,
            "alias": entry.alias, "status": entry.status}


def model_not_found(exc: ModelNotFoundError) -> Problem:
    """404 for a name that names nothing: naming ``model``, with OpenAI's ``error.code`` and ``models``, the
    names that work."""
    return Problem(404, str(exc), [{"field": "model", "message": exc.problem}], code=MODEL_NOT_FOUND,
                   extra={"models": list(exc.known)})


@models_router.get("/v1/models", summary="Every model name that answers (OpenAI's model list)",
            description="Each branch with a champion (`main`), its aliases (`main@champion`, `main@challenger` "
                        "while one awaits approval), each of its generations that can answer (`main@3`), and "
                        "`auto` (the router chooses per request). Besides OpenAI's fields: `branch`, "
                        "`generation` (what the name answers with now), `alias` and `status`.")
async def list_models(state: StateDep, token: Ingest) -> dict[str, Any]:
    entries = await anyio.to_thread.run_sync(state.pool.models.entries)
    return {"object": "list", "data": [model_object(e) for e in entries]}


@models_router.get("/v1/models/{model}", summary="One model name: what it answers with now",
            responses={404: {"description": "No such model; `models` lists the names that work."}})
async def get_model(state: StateDep, token: Ingest, model: str) -> Any:
    entries = await anyio.to_thread.run_sync(state.pool.models.entries)
    found = next((e for e in entries if e.name == model), None)
    if found is not None:
        return model_object(found)
    try:  # not listed: the resolver says what is wrong with the name, and what exists
        await anyio.to_thread.run_sync(state.pool.models.pin, model)
    except ModelNotFoundError as exc:
        raise model_not_found(exc) from exc
    raise model_not_found(ModelNotFoundError(model, "its generation's files are missing", [e.name for e in entries]))


@router.get("/v1/generations", summary="Every generation with its aliases")
async def list_generations(state: StateDep, token: Admin) -> list[dict[str, Any]]:
    return await anyio.to_thread.run_sync(views.generations_view, state.context)


@router.get("/v1/generations/{generation_id}", summary="One generation with its metrics")
async def get_generation(state: StateDep, token: Admin, generation_id: GenerationId) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(views.generation_detail, state.context, generation_id)


@router.get("/v1/lineage", response_class=HTMLResponse,
            summary="The lineage page: each branch's tree of generations, status, aliases, key metrics, reports")
async def lineage_page(request: Request, state: StateDep, token: AdminSignIn) -> Response:
    secret = sign_in_token(request)
    if secret:  # a browser signing in (its token checked by AdminSignIn): on to the page, the token in a cookie
        return signed_in_redirect(request, secret, "/v1/lineage")
    rows = await anyio.to_thread.run_sync(lineage_rows, state.context)
    return HTMLResponse(render_lineage_html(rows))


@router.get("/v1/generations/{generation_id}/report", response_class=Response,
            summary="The generation's report (HTML by default; md or json)")
async def get_report(state: StateDep, token: Admin, generation_id: GenerationId,
                     format: Literal["html", "md", "json"] = "html") -> Response:
    def locate() -> FileResponse:
        return FileResponse(report_file(state.context, generation_id, format),
                            media_type=REPORT_FILES[format].media_type)

    return await anyio.to_thread.run_sync(locate)


@router.post("/v1/generations/{generation_id}/promote",
             summary="Make a generation the champion of its branch (served from the next request on)")
async def promote(state: StateDep, token: Admin, generation_id: GenerationId) -> dict[str, Any]:
    generation = await anyio.to_thread.run_sync(promote_generation, state.context, generation_id)
    log.info("generation %s promoted to champion of %s through the API (token %s)",
             generation.id, generation.branch, token.name)
    return await anyio.to_thread.run_sync(views.generation_detail, state.context, generation.id)
