"""The HTTP API (FastAPI): ingest, feedback, OpenAI-compatible chat, generations, cycles, health, metrics.

``create_app(context)`` builds it; ``selftune serve`` runs it under uvicorn beside the scheduler.

- Errors are RFC 9457 ``application/problem+json`` documents whose ``errors`` name each bad field;
  nothing the service did not mean to say (a stack trace, SQL) ever reaches a response.
- Bearer tokens (``selftune token create``): ``ingest`` may send interactions, feedback and chat
  requests (and list the models); ``admin`` may do everything. Only the health and metrics
  endpoints and the OpenAPI document are open (the service binds 127.0.0.1 by default).
- Bodies are bounded (``server.max_body_bytes``, ``server.max_batch_rows``); a batch with one bad row
  is refused whole, so nothing of a refused request is ever written.
- Blocking work (database, torch) runs in worker threads: the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Annotated, Any, Literal

import anyio
import orjson
from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from selftune.policies.errors import (
    ArtifactError,
    ConflictError,
    InvalidRecordError,
    NotFoundError,
    SelftuneError,
)
from selftune.policies.ingest import FORMATS, RowDefaults, parse_feedback, parse_row
from selftune.policies.records import ApiToken, InteractionIn

from selftune.daemon import views
from selftune.daemon.context import Context
from selftune.daemon.reports.files import REPORT_FILES, report_file
from selftune.daemon.service.metrics import CONTENT_TYPE, Metrics
from selftune.daemon.service.pool import Champion, ChampionPool, Completion, SamplingParams, clamp_temperature

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"
CHAT_ID_PREFIX = "chatcmpl-"
MAX_WAITING_GENERATIONS = 32
"""Chat requests queued behind the one generating; more are refused with 503 and Retry-After."""
GENERATION_THREADS = 2
PRELOAD_RETRY_SECONDS = 10
OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                      409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
                      503: "service_unavailable"}


# -- problems ----------------------------------------------------------------------------------------


class Problem(Exception):
    """An error answered as problem+json. ``errors`` are ``{"field", "message"}``, one per bad field."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.headers = headers or {}


def invalid(field: str, message: str) -> Problem:
    return Problem(422, f"{field}: {message}", [{"field": field, "message": message}])


def problem_response(status: int, detail: str, errors: list[dict[str, str]] | None = None,
                     instance: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status,
                            "detail": detail}
    if instance:
        body["instance"] = instance
    if errors:
        body["errors"] = errors
    # The same error in OpenAI's shape, so that OpenAI client libraries show its message.
    body["error"] = {"message": detail, "type": OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500
                                                                        else "invalid_request_error"),
                     "param": errors[0]["field"] if errors else None, "code": None}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.detail, exc.errors, request.url.path, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": _field_name(e.get("loc", ())), "message": str(e.get("msg", "invalid"))}
                  for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5]) or "invalid request"
        return problem_response(422, detail, errors, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        errors = None
        if exc.status_code == 400:  # FastAPI's own answer to a body it cannot decode
            detail = "body: not valid JSON in UTF-8: send a JSON object"
            errors = [{"field": "body", "message": "not valid JSON in UTF-8"}]
        return problem_response(exc.status_code, detail, errors, request.url.path, dict(exc.headers or {}))

    @app.exception_handler(InvalidRecordError)
    async def _invalid(request: Request, exc: InvalidRecordError) -> JSONResponse:
        return problem_response(422, str(exc), [{"field": "body", "message": exc.reason}], request.url.path)

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return problem_response(404, str(exc), None, request.url.path)

    @app.exception_handler(ConflictError)
    async def _conflict(request: Request, exc: ConflictError) -> JSONResponse:
        return problem_response(409, str(exc), None, request.url.path)

    @app.exception_handler(ArtifactError)
    async def _artifact(request: Request, exc: ArtifactError) -> JSONResponse:
        log.error("artifact error on %s: %s", request.url.path, exc)
        return problem_response(500, "a generation's files are missing or damaged; the service log says which",
                                None, request.url.path)

    @app.exception_handler(SelftuneError)
    async def _selftune(request: Request, exc: SelftuneError) -> JSONResponse:
        return problem_response(400, str(exc), None, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        incident = uuid.uuid4().hex[:12]
        log.error("unexpected error %s on %s %s", incident, request.method, request.url.path, exc_info=exc)
        return problem_response(500, f"internal error (incident {incident}; the service log has the details)",
                                None, request.url.path)


def _field_name(loc: Any) -> str:
    """Pydantic's error location as a field path: ("body", "messages", 0, "content") -> "messages[0].content"."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")] or list(loc[:1]) or ["body"]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# -- middleware: body limit and metrics --------------------------------------------------------------


class _BodyTooLarge(Problem):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over {limit} bytes (server.max_body_bytes): send less per request",
                         [{"field": "body", "message": f"larger than {limit} bytes"}])


class BodyLimit:
    """Refuse bodies over ``server.max_body_bytes``: at once by Content-Length, else while they stream in."""

    def __init__(self, app: ASGIApp, context: Context) -> None:
        self.app = app
        self.context = context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.context.config.server.max_body_bytes  # read per request: a reload (SIGHUP) applies at once
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            error = _BodyTooLarge(limit)
            response = problem_response(413, error.detail, error.errors, scope.get("path"))
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """Count and time every request by its route template (not its raw path: bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.http_requests.labels(method, template, str(status)).inc()
            self.metrics.http_duration.labels(method, template).observe(time.perf_counter() - started)


class Draining:
    """While the service stops (``app.state.accepting`` False), refuse new writes with 503 + Retry-After."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.state.accepting and scope["method"] not in ("GET", "HEAD"):
            response = problem_response(503, "the service is shutting down: retry shortly", None, scope.get("path"),
                                        {"Retry-After": "5", "Connection": "close"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


# -- authentication ----------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="A token from `selftune token create --scope ingest|admin`.")
COOKIE = "selftune_token"
"""A browser's token for the HTML pages: set by ``GET /v1/lineage?token=...``, honoured on GET requests only
(HttpOnly, SameSite=Strict), so that the page's links to reports open in the same browser."""


def _verify(context: Context, secret: str | None) -> ApiToken:
    if not secret:
        raise Problem(401, "this endpoint needs a bearer token: Authorization: Bearer <token> "
                      "(create one with `selftune token create`; in a browser open /v1/lineage?token=<token>)",
                      headers={"WWW-Authenticate": "Bearer"})
    with context.store.transaction() as tx:
        token = tx.tokens.verify(secret)
    if token is None:
        raise Problem(401, "the bearer token is unknown or revoked", headers={"WWW-Authenticate": "Bearer"})
    return token


def require(scope: Literal["ingest", "admin"]) -> Callable[..., Awaitable[ApiToken]]:
    """A dependency that admits a live token of ``scope`` (an admin token is admitted everywhere)."""

    async def dependency(request: Request,
                         credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> ApiToken:
        token = await anyio.to_thread.run_sync(_verify, request.app.state.context, _secret(request, credentials))
        if scope == "admin" and token.scope != "admin":
            raise Problem(403, f"token {token.name!r} has scope {token.scope!r}; this endpoint needs an admin token")
        return token

    return dependency


def _secret(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    """The bearer token; on GET also the browser's cookie or a ``?token=`` (nothing that a write could ride on)."""
    if credentials is not None:
        return credentials.credentials if credentials.scheme.lower() == "bearer" else None
    if request.method in ("GET", "HEAD"):
        return request.query_params.get("token") or request.cookies.get(COOKIE)
    return None


Ingest = Annotated[ApiToken, Depends(require("ingest"))]
Admin = Annotated[ApiToken, Depends(require("admin"))]


# -- request and response models (documented in the OpenAPI schema) ----------------------------------


class IngestResponse(BaseModel):
    accepted: int
    duplicates: int
    rejected: int = 0
    id: int | None = Field(None, description="For a single row: the interaction's id (also when it was a duplicate "
                                             "with an external id); null for batches.")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request. Parameters selftune does not use are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(description="A branch name (GET /v1/models lists them); its champion answers.")
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = Field(None, max_length=256)
    domain: str | None = Field(None, description="selftune: the domain the logged interaction is filed under.")
    tags: list[str] | None = Field(None, description="selftune: tags of the logged interaction.")


class CycleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    branch: str | None = Field(None, description="Branch to run a cycle on [default: ingest.default_branch].")


ROW_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One interaction in any of the ingest formats, plus optional id, domain, tags, feedback.",
    "anyOf": [
        {"title": "OpenAI chat", "required": ["messages"], "properties": {"messages": {"type": "array", "items": {
            "type": "object", "required": ["role", "content"],
            "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"}}}}}},
        {"title": "ShareGPT", "required": ["conversations"], "properties": {"conversations": {
            "type": "array", "items": {"type": "object", "required": ["from", "value"],
            "properties": {"from": {"type": "string"}, "value": {"type": "string"}}}}}},
        {"title": "prompt/response", "required": ["prompt", "response"],
         "properties": {"prompt": {"type": "string"}, "response": {"type": "string"}, "system": {"type": "string"}}},
    ],
    "properties": {"id": {"type": ["string", "integer"]}, "domain": {"type": "string"},
                   "tags": {"type": "array", "items": {"type": "string"}}, "feedback": {}},
}
INGEST_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "oneOf": [ROW_SCHEMA, {"type": "array", "items": ROW_SCHEMA, "minItems": 1}]}}}}}
FEEDBACK_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "description": 'Thumbs ("up"/"down"/true/false), a score, {"thumbs", "score", "correction", "chosen", '
                   '"rejected", "comment"}, or a list of these.'}}}}}


# -- the app -----------------------------------------------------------------------------------------


def create_app(context: Context, *, pool: ChampionPool | None = None, metrics: Metrics | None = None,
               preload: bool = True) -> FastAPI:
    """The API over ``context``. ``preload`` loads the default branch's champion at startup (in the
    background: /readyz answers 503 until it is loaded)."""
    metrics = metrics or Metrics()
    pool = pool or ChampionPool(context, metrics, threads=context.config.model.threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.generation_limiter = anyio.CapacityLimiter(GENERATION_THREADS)
        loader = asyncio.create_task(_preload(app)) if preload else None
        yield
        if loader is not None and not loader.done():
            loader.cancel()

    app = FastAPI(title="selftune", version="1", lifespan=lifespan,
                  description="A continual self-tuning daemon for small language models. Errors are "
                              "application/problem+json documents whose `errors` name the bad fields.")
    app.state.context = context
    app.state.pool = pool
    app.state.metrics = metrics
    app.state.accepting = True
    app.state.preload_error = None
    _install_problem_handlers(app)
    app.add_middleware(BodyLimit, context=context)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(Draining, state=app.state)

    _health_routes(app)
    _interaction_routes(app)
    _chat_routes(app)
    _generation_routes(app)
    _cycle_routes(app)
    return app


async def _preload(app: FastAPI) -> None:
    """Load the default branch's champion; on failure say why in /readyz and try again every little while."""
    context: Context = app.state.context
    while True:
        branch = context.config.ingest.default_branch
        try:
            await anyio.to_thread.run_sync(app.state.pool.get, branch)
            app.state.preload_error = None
            return
        except Exception as exc:  # noqa: BLE001 - reported by /readyz; serving goes on without it
            app.state.preload_error = f"{type(exc).__name__}: {exc}"
            log.error("could not load the champion of branch %s (retrying in %s s): %s", branch,
                      PRELOAD_RETRY_SECONDS, exc)
        await asyncio.sleep(PRELOAD_RETRY_SECONDS)


def readiness(app: FastAPI) -> list[str]:
    """What keeps the service from being ready; empty when the database answers and a champion is loaded."""
    problems = []
    context: Context = app.state.context
    try:
        with context.store.transaction() as tx:
            tx.connection.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", said in words
        problems.append(f"database unreachable: {type(exc).__name__}")
    branch = context.config.ingest.default_branch
    if app.state.pool.current(branch) is None:
        reason = app.state.preload_error or "still loading"
        problems.append(f"no champion loaded for branch {branch!r} ({reason})")
    return problems


def _health_routes(app: FastAPI) -> None:
    @app.get("/livez", tags=["health"], summary="The process answers")
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="The database answers and a champion is loaded",
             responses={503: {"description": "Not ready; `detail` says why."}})
    async def readyz(request: Request) -> Response:
        problems = await anyio.to_thread.run_sync(readiness, request.app)
        request.app.state.metrics.ready.set(0 if problems else 1)
        if problems:
            return problem_response(503, "; ".join(problems), None, "/readyz")
        return JSONResponse({"status": "ready", "champions": request.app.state.pool.loaded()})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint(request: Request) -> Response:
        return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE)


# -- interactions and feedback -----------------------------------------------------------------------


def _decode_json(body: bytes) -> Any:
    if not body.strip():
        raise invalid("body", "the body is empty: send a JSON object or a list of them")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise invalid("body", f"not valid JSON ({exc})") from None


def parse_rows(value: Any, fmt: str, defaults: RowDefaults, max_rows: int) -> tuple[list[InteractionIn], bool]:
    """The body's rows (one object or a list), each through the ingest parser; every bad row is named."""
    single = isinstance(value, dict)
    rows = [value] if single else value
    if not isinstance(rows, list):
        raise invalid("body", f"expected a JSON object or a list of objects, got {type(value).__name__}")
    if not rows:
        raise invalid("body", "the list is empty: send at least one interaction")
    if len(rows) > max_rows:
        raise invalid("body", f"{len(rows)} rows is over server.max_batch_rows = {max_rows}: split the batch")
    parsed, errors = [], []
    for index, row in enumerate(rows):
        try:
            parsed.append(parse_row(row, fmt, defaults))
        except InvalidRecordError as exc:
            errors.append({"field": "body" if single else f"body[{index}]", "message": exc.reason})
    if errors:
        shown = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise Problem(422, f"{len(errors)} invalid row(s), nothing was written: {shown}{more}", errors[:100])
    return parsed, single


def _ingest(context: Context, body: bytes, branch: str | None, domain: str | None,
            fmt: str) -> tuple[dict[str, Any], str]:
    """Parse and store the body's rows; the answer and the branch of the first row."""
    from selftune.daemon.lineage import domain_routes

    target = branch or context.config.ingest.default_branch
    with context.store.transaction() as tx:
        if tx.branches.find(target) is None:
            raise invalid("branch", f"no branch {target!r}: known branches are "
                                    f"{', '.join(b.name for b in tx.branches.list()) or 'none (run selftune init)'}")
    defaults = RowDefaults(branch=target, domain=domain, source="api",
                           max_message_chars=context.config.ingest.max_message_chars,
                           routes={} if branch else domain_routes(context))
    rows, single = parse_rows(_decode_json(body), fmt, defaults, context.config.server.max_batch_rows)
    with context.store.transaction(write=True) as tx:
        result = tx.interactions.add_batch(rows)
        row_id = _single_row_id(tx, rows[0], result.accepted) if single else None
    return {"accepted": result.accepted, "duplicates": result.duplicates, "rejected": 0, "id": row_id}, rows[0].branch


def _single_row_id(tx: Any, row: InteractionIn, accepted: int) -> int | None:
    """The id of the one row just written (or already there), looked up inside the writing transaction."""
    if row.external_id is not None:
        found = tx.interactions.find_by_external_id(row.branch, row.external_id)
        return None if found is None else found.id
    # Writers are serialised (SQLite's lock; an advisory lock on PostgreSQL), so inside this transaction
    # the branch's newest id is the row this transaction inserted.
    return tx.interactions.max_id(row.branch) if accepted else None


def _resolve_interaction(tx: Any, reference: str) -> int:
    """An interaction id, or a chat completion id (the external id its exchange was logged under)."""
    if reference.isascii() and reference.isdigit() and int(reference) < 2**63:  # ids are 64-bit in the database
        interaction_id = int(reference)
        tx.interactions.get(interaction_id)
        return interaction_id
    if reference.startswith(CHAT_ID_PREFIX):
        for branch in tx.branches.list():
            found = tx.interactions.find_by_external_id(branch.name, reference)
            if found is not None:
                return found.id
    raise NotFoundError(f"interaction {reference[:80]!r} does not exist: use the id that POST /v1/interactions "
                        "or POST /v1/chat/completions returned")


def _interaction_routes(app: FastAPI) -> None:
    @app.post("/v1/interactions", tags=["interactions"], response_model=IngestResponse, openapi_extra=INGEST_BODY,
              summary="Log interactions: one object or a list; OpenAI chat, ShareGPT or prompt/response rows",
              description="Idempotent: a row with an `id` (external id) already stored on its branch, or the "
                          "same content without one, counts as a duplicate. A list with one invalid row is "
                          "refused whole (422, every bad row named) and nothing is written.")
    async def post_interactions(
        request: Request, token: Ingest,
        branch: Annotated[str | None, Query(max_length=64, description="Branch [default: by domain route, "
                                                                       "else ingest.default_branch].")] = None,
        domain: Annotated[str | None, Query(max_length=64, description="Domain of rows that name none.")] = None,
        format: Annotated[Literal[FORMATS], Query(description="Row format.")] = "auto",  # type: ignore[valid-type]
    ) -> dict[str, Any]:
        body = await request.body()
        context: Context = request.app.state.context
        result, target = await anyio.to_thread.run_sync(_ingest, context, body, branch, domain, format)
        counter = request.app.state.metrics.interactions
        counter.labels(target, "accepted").inc(result["accepted"])
        counter.labels(target, "duplicate").inc(result["duplicates"])
        return result

    @app.post("/v1/interactions/{interaction_id}/feedback", tags=["interactions"], status_code=201,
              openapi_extra=FEEDBACK_BODY, summary="Attach feedback to an interaction (or a chat completion id)")
    async def post_feedback(request: Request, token: Ingest,
                            interaction_id: Annotated[str, Path(max_length=300)]) -> dict[str, Any]:
        value = _decode_json(await request.body())
        try:
            items = parse_feedback(value)
        except InvalidRecordError as exc:
            raise invalid("body", exc.reason) from None
        if not items:
            raise invalid("body", "no feedback given: the list is empty")
        context: Context = request.app.state.context

        def store() -> list[dict[str, Any]]:
            with context.store.transaction(write=True) as tx:
                target = _resolve_interaction(tx, interaction_id)
                return [views.feedback_view(tx.feedback.add(target, item)) for item in items]

        stored = await anyio.to_thread.run_sync(store)
        for item in stored:
            request.app.state.metrics.feedback.labels(item["kind"]).inc()
        return {"interaction_id": stored[0]["interaction_id"], "feedback": stored}

    @app.get("/v1/interactions", tags=["interactions"], summary="Interactions in id order (keyset pagination)")
    async def list_interactions(
        request: Request, token: Admin,
        branch: Annotated[str | None, Query(max_length=64)] = None,
        domain: Annotated[str | None, Query(max_length=64)] = None,
        after: Annotated[int | None, Query(ge=0, description="Only ids above this: pass `next_after`.")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        context: Context = request.app.state.context

        def read() -> dict[str, Any]:
            with context.store.transaction() as tx:
                rows = tx.interactions.list(branch=branch, domain=domain, after_id=after, limit=limit)
                feedback = tx.feedback.for_interactions([r.id for r in rows])
            data = [views.interaction_view(r, feedback.get(r.id)) for r in rows]
            return {"data": data, "next_after": rows[-1].id if len(rows) == limit else None}

        return await anyio.to_thread.run_sync(read)

    @app.get("/v1/interactions/{interaction_id}", tags=["interactions"], summary="One interaction with its feedback")
    async def get_interaction(request: Request, token: Admin,
                              interaction_id: Annotated[str, Path(max_length=300)]) -> dict[str, Any]:
        context: Context = request.app.state.context

        def read() -> dict[str, Any]:
            with context.store.transaction() as tx:
                found = tx.interactions.get(_resolve_interaction(tx, interaction_id))
                return views.interaction_view(found, tx.feedback.for_interaction(found.id))

        return await anyio.to_thread.run_sync(read)


# -- OpenAI-compatible chat ----------------------------------------------------------------------------


def _plain_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """The request's messages as {"role", "content"} strings (text parts joined; "developer" is "system")."""
    out = []
    for i, message in enumerate(request.messages):
        content = message.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise invalid(f"messages[{i}].content[{j}].type", f"{part.type!r}: only text parts are supported")
            content = "".join(part.text or "" for part in content)
        if content is None:
            raise invalid(f"messages[{i}].content", "is missing: every message needs text")
        out.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    return out


def _check_conversation(context: Context, request: ChatCompletionRequest, messages: list[dict[str, str]]) -> None:
    """Validate the exchange with the ingest parser before any work (a placeholder stands for the answer)."""
    try:
        _exchange_row(context, request, messages, ".", CHAT_ID_PREFIX + "check", Completion(".", "stop", 0, 0, 0, 0.0))
    except InvalidRecordError as exc:
        field = next((name for name in ("domain", "tags", "user") if exc.reason.startswith(f"'{name}'")), "messages")
        raise invalid(field, exc.reason) from None


def _sampling(context: Context, request: ChatCompletionRequest) -> SamplingParams:
    server = context.config.server
    wanted = request.max_completion_tokens or request.max_tokens or server.default_max_tokens
    if wanted > server.max_tokens_limit:
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise invalid(field, f"{wanted} is over server.max_tokens_limit = {server.max_tokens_limit}")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > 4 or any(not s or len(s) > 200 for s in stops):
        raise invalid("stop", "give at most 4 non-empty stop strings of at most 200 characters")
    temperature = 1.0 if request.temperature is None else request.temperature
    return SamplingParams(max_new_tokens=wanted, temperature=clamp_temperature(temperature),
                          top_p=1.0 if request.top_p is None else request.top_p, stop=tuple(stops), seed=request.seed)


def _exchange_row(context: Context, request: ChatCompletionRequest, messages: list[dict[str, str]], answer: str,
                  external_id: str, completion: Completion) -> InteractionIn:
    row: dict[str, Any] = {"messages": [*messages, {"role": "assistant", "content": answer}], "id": external_id,
                           "generation": completion.generation_id,
                           "usage": {"prompt_tokens": completion.prompt_tokens,
                                     "completion_tokens": completion.completion_tokens}}
    if request.domain is not None:
        row["domain"] = request.domain
    if request.tags is not None:
        row["tags"] = request.tags
    if request.user is not None:
        row["user"] = request.user
    return parse_row(row, "openai", RowDefaults(branch=request.model, source="api:chat",
                                                max_message_chars=context.config.ingest.max_message_chars))


def _log_exchange(context: Context, request: ChatCompletionRequest, messages: list[dict[str, str]],
                  completion: Completion, external_id: str) -> int | None:
    """Store the exchange as an interaction under its unique external id; its id, or None if it was not
    logged (an empty answer is no interaction)."""
    try:
        row = _exchange_row(context, request, messages, completion.text, external_id, completion)
    except InvalidRecordError as exc:
        log.warning("chat completion %s not logged: %s", external_id, exc.reason)
        return None
    with context.store.transaction(write=True) as tx:
        tx.interactions.add_batch([row])
        found = tx.interactions.find_by_external_id(row.branch, external_id)
    return None if found is None else found.id


def _usage(completion: Completion) -> dict[str, int]:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


def _chat_routes(app: FastAPI) -> None:
    @app.get("/v1/models", tags=["chat"], summary="The branches whose champion can answer (OpenAI's model list)")
    async def list_models(request: Request, token: Ingest) -> dict[str, Any]:
        context: Context = request.app.state.context

        def read() -> list[dict[str, Any]]:
            with context.store.transaction() as tx:
                aliases = [a for a in tx.aliases.list() if a.name == "champion"]
            return [{"id": a.branch, "object": "model", "created": int(a.updated_at.timestamp()),
                     "owned_by": "selftune", "generation": a.generation_id} for a in aliases]

        return {"object": "list", "data": await anyio.to_thread.run_sync(read)}

    @app.post("/v1/chat/completions", tags=["chat"], summary="OpenAI-compatible chat completion by a champion",
              description="The branch named by `model` answers with its current champion. The exchange is "
                          "logged as an interaction: the response `id` is that interaction's id, so feedback "
                          "can follow (POST /v1/interactions/{id}/feedback). With `stream: true` the answer "
                          "comes as server-sent events; their `id` is the completion id the exchange is "
                          "logged under (the feedback endpoint takes it too), and the last event carries "
                          "`interaction_id`.")
    async def chat_completions(request: Request, body: ChatCompletionRequest, token: Ingest) -> Any:
        context: Context = request.app.state.context
        messages = _plain_messages(body)
        _check_conversation(context, body, messages)
        params = _sampling(context, body)
        limiter: anyio.CapacityLimiter = request.app.state.generation_limiter
        if limiter.statistics().tasks_waiting >= MAX_WAITING_GENERATIONS:
            raise Problem(503, "too many chat completions are waiting: retry shortly", headers={"Retry-After": "2"})
        try:
            champion: Champion = await anyio.to_thread.run_sync(request.app.state.pool.get, body.model)
        except NotFoundError as exc:
            raise Problem(404, str(exc), [{"field": "model", "message": str(exc)}]) from None
        try:
            prompt_ids = await anyio.to_thread.run_sync(champion.prompt_ids, messages)
            champion.budget(len(prompt_ids), params.max_new_tokens)
        except InvalidRecordError as exc:
            raise invalid("messages", exc.reason) from None
        external_id = f"{CHAT_ID_PREFIX}{uuid.uuid4().hex}"
        if body.stream:
            return StreamingResponse(_stream(request, body, messages, champion, prompt_ids, params, external_id),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        completion = await anyio.to_thread.run_sync(champion.generate, prompt_ids, params, limiter=limiter)
        interaction_id = await anyio.to_thread.run_sync(_log_exchange, context, body, messages, completion, external_id)
        _count_completion(request, body.model, completion, stream=False)
        return {"id": str(interaction_id) if interaction_id is not None else external_id,
                "object": "chat.completion", "created": int(time.time()), "model": body.model,
                "system_fingerprint": f"generation-{completion.generation_id}", "interaction_id": interaction_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                             "finish_reason": completion.finish_reason, "logprobs": None}],
                "usage": _usage(completion)}


def _count_completion(request: Request, branch: str, completion: Completion, stream: bool) -> None:
    metrics: Metrics = request.app.state.metrics
    metrics.completions.labels(branch, str(stream).lower()).inc()
    metrics.completion_tokens.labels(branch).inc(completion.completion_tokens)
    metrics.prompt_tokens.labels(branch).inc(completion.prompt_tokens)
    metrics.generation_seconds.labels(branch).observe(completion.seconds)


_DONE = object()


async def _stream(request: Request, body: ChatCompletionRequest, messages: list[dict[str, str]], champion: Champion,
                  prompt_ids: list[int], params: SamplingParams, external_id: str) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's chunk format; generation runs in a thread and hands text over a queue."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[Any] = asyncio.Queue()
    cancelled = threading.Event()
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        document = {"id": external_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "system_fingerprint": f"generation-{champion.generation_id}",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return b"data: " + orjson.dumps(document) + b"\n\n"

    def hand_over(piece: str) -> None:  # called in the generating thread
        loop.call_soon_threadsafe(pieces.put_nowait, piece)

    def generate() -> Completion:
        try:
            return champion.generate(prompt_ids, params, hand_over, cancelled)
        finally:
            loop.call_soon_threadsafe(pieces.put_nowait, _DONE)

    worker = asyncio.ensure_future(anyio.to_thread.run_sync(generate, limiter=request.app.state.generation_limiter))
    try:
        yield chunk({"role": "assistant", "content": ""})
        while (piece := await pieces.get()) is not _DONE:
            yield chunk({"content": piece})
        try:
            completion = await worker
            interaction_id = await anyio.to_thread.run_sync(
                _log_exchange, request.app.state.context, body, messages, completion, external_id)
        except Exception as exc:  # noqa: BLE001 - the headers are out: report in the stream, as OpenAI does
            log.error("streamed completion %s failed", external_id, exc_info=exc)
            error = {"error": {"message": "generation failed; the service log has the details", "type": "server_error"}}
            yield b"data: " + orjson.dumps(error) + b"\n\n"
            return
        _count_completion(request, body.model, completion, stream=True)
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        yield chunk({}, completion.finish_reason, interaction_id=interaction_id,
                    **({"usage": _usage(completion)} if include_usage else {}))
        yield b"data: [DONE]\n\n"
    finally:
        cancelled.set()  # the client went away (or we are done): stop generating


# -- generations and cycles ----------------------------------------------------------------------------


def _generation_routes(app: FastAPI) -> None:
    @app.get("/v1/generations", tags=["generations"], summary="Every generation with its aliases")
    async def list_generations(request: Request, token: Admin) -> list[dict[str, Any]]:
        return await anyio.to_thread.run_sync(views.generations_view, request.app.state.context)

    @app.get("/v1/generations/{generation_id}", tags=["generations"], summary="One generation with its metrics")
    async def get_generation(request: Request, token: Admin,
                             generation_id: Annotated[int, Path(ge=0, le=2**31)]) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(views.generation_detail, request.app.state.context, generation_id)

    @app.get("/v1/lineage", tags=["generations"], response_class=HTMLResponse,
             summary="The lineage page: each branch's tree of generations, status, aliases, key metrics, reports")
    async def lineage_page(request: Request, token: Admin) -> Response:
        from selftune.daemon.reports.report import lineage_rows, render_lineage_html

        secret = request.query_params.get("token")
        if secret:  # a browser signing in: keep the token in a cookie, and out of the address bar and history
            response = RedirectResponse("/v1/lineage", status_code=303)
            response.set_cookie(COOKIE, secret, httponly=True, samesite="strict", path="/v1",
                                secure=request.url.scheme == "https")
            return response
        rows = await anyio.to_thread.run_sync(lineage_rows, request.app.state.context)
        return HTMLResponse(render_lineage_html(rows))

    @app.get("/v1/generations/{generation_id}/report", tags=["generations"], response_class=Response,
             summary="The generation's report (HTML by default; md or json)")
    async def get_report(request: Request, token: Admin, generation_id: Annotated[int, Path(ge=0, le=2**31)],
                         format: Literal["html", "md", "json"] = "html") -> Response:
        context: Context = request.app.state.context

        def locate() -> Any:
            return FileResponse(report_file(context, generation_id, format), media_type=REPORT_FILES[format].media_type)

        return await anyio.to_thread.run_sync(locate)

    @app.post("/v1/generations/{generation_id}/promote", tags=["generations"],
              summary="Make a generation the champion of its branch (served from the next request on)")
    async def promote(request: Request, token: Admin,
                      generation_id: Annotated[int, Path(ge=0, le=2**31)]) -> dict[str, Any]:
        from selftune.daemon.lineage import promote as promote_generation

        context: Context = request.app.state.context
        generation = await anyio.to_thread.run_sync(promote_generation, context, generation_id)
        log.info("generation %s promoted to champion of %s through the API (token %s)",
                 generation.id, generation.branch, token.name)
        return await anyio.to_thread.run_sync(views.generation_detail, context, generation.id)


def _cycle_routes(app: FastAPI) -> None:
    @app.post("/v1/cycles", tags=["cycles"], status_code=202,
              summary="Start a cycle on a branch (returns at once; 409 if one is running)")
    async def start(request: Request, token: Admin, body: CycleRequest | None = None) -> dict[str, Any]:
        from selftune.daemon.cycle.control import start_cycle

        context: Context = request.app.state.context
        branch = (body.branch if body else None) or context.config.ingest.default_branch
        cycle = await anyio.to_thread.run_sync(start_cycle, context, branch, "api")
        request.app.state.metrics.cycles_started.labels(branch, "api").inc()
        return await anyio.to_thread.run_sync(views.cycle_view, context, cycle.id)

    @app.get("/v1/cycles/{cycle_id}", tags=["cycles"], summary="A cycle: its state, steps and gates")
    async def get(request: Request, token: Admin, cycle_id: Annotated[int, Path(ge=1, le=2**31)]) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(views.cycle_view, request.app.state.context, cycle_id)

    @app.delete("/v1/cycles/{cycle_id}", tags=["cycles"], status_code=202,
                summary="Cancel a running cycle (its training checkpoints and stops)")
    async def cancel(request: Request, token: Admin, cycle_id: Annotated[int, Path(ge=1, le=2**31)]) -> dict[str, Any]:
        from selftune.daemon.cycle.control import cancel_cycle

        context: Context = request.app.state.context
        await anyio.to_thread.run_sync(cancel_cycle, context, cycle_id)
        return await anyio.to_thread.run_sync(views.cycle_view, context, cycle_id)


def openapi_json(context: Context) -> str:
    """The OpenAPI document (for docs and fuzzing), without starting anything."""
    return json.dumps(create_app(context, preload=False).openapi(), indent=1)
