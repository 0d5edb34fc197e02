"""Generations: list, detail, the lineage page, reports, and promotion (admin only)."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Path, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from selftune.daemon import views
from selftune.daemon.http.auth import Admin, sign_in_token, signed_in_redirect
from selftune.daemon.http.state import StateDep
from selftune.daemon.lineage import promote as promote_generation
from selftune.daemon.reports.files import REPORT_FILES, report_file
from selftune.daemon.reports.lineage import lineage_rows, render_lineage_html

log = logging.getLogger(__name__)
GenerationId = Annotated[int, Path(ge=0, le=2**31)]

router = APIRouter(tags=["generations"])


@router.get("/v1/generations", summary="Every generation with its aliases")
async def list_generations(state: StateDep, token: Admin) -> list[dict[str, Any]]:
    return await anyio.to_thread.run_sync(views.generations_view, state.context)


@router.get("/v1/generations/{generation_id}", summary="One generation with its metrics")
async def get_generation(state: StateDep, token: Admin, generation_id: GenerationId) -> dict[str, Any]:
    return await anyio.to_thread.run_sync(views.generation_detail, state.context, generation_id)


@router.get("/v1/lineage", response_class=HTMLResponse,
            summary="The lineage page: each branch's tree of generations, status, aliases, key metrics, reports")
async def lineage_page(request: Request, state: StateDep, token: Admin) -> Response:
    secret = sign_in_token(request)
    if secret:  # a browser signing in (its token checked by Admin): on to the page, the token in a cookie
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
