"""Errors as RFC 9457 ``application/problem+json`` documents, with the same error in OpenAI's shape.

Every error the API answers goes through ``problem_response``: ``errors`` name each bad field, and
nothing the service did not mean to say (a stack trace, SQL) ever reaches a response.
"""

from __future__ import annotations

import logging
import uuid
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from selftune.policies.errors import (ArtifactError, ConflictError, DatabaseBusyError, DatabaseFullError,
                                      DatabaseUnavailableError, InvalidRecordError, NotFoundError, SelftuneError)

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"
CLIENT_CLOSED_REQUEST = 499
OPENAI_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                      409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
                      503: "service_unavailable"}
BUSY_RETRY_AFTER_SECONDS = 5
"""Retry-After of a write refused because the database stayed locked past its busy timeout."""


class Problem(Exception):
    """An error answered as problem+json. ``errors`` are ``{"field", "message"}``, one per bad field."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None, code: str | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.headers = headers or {}
        self.code = code
        """OpenAI's ``error.code`` where OpenAI has one (e.g. "model_not_found")."""
        self.extra = extra or {}
        """More members of the problem document (e.g. ``models``: the names that work)."""


def invalid(field: str, message: str, code: str | None = None) -> Problem:
    return Problem(422, f"{field}: {message}", [{"field": field, "message": message}], code=code)


def validation_problem(exc: RequestValidationError) -> Problem:
    """FastAPI's validation error as a Problem naming each bad field."""
    errors = [{"field": _field_name(e.get("loc", ())), "message": str(e.get("msg", "invalid"))} for e in exc.errors()]
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5]) or "invalid request"
    return Problem(422, detail, errors)


def problem_response(status: int, detail: str, errors: list[dict[str, str]] | None = None,
                     instance: str | None = None, headers: dict[str, str] | None = None, code: str | None = None,
                     extra: dict[str, Any] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status,
                            "detail": detail, **(extra or {})}
    if instance:
        body["instance"] = instance
    if errors:
        body["errors"] = errors
    # The same error in OpenAI's shape, so that OpenAI client libraries show its message.
    body["error"] = {"message": detail, "type": OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500
                                                                        else "invalid_request_error"),
                     "param": errors[0]["field"] if errors else None, "code": code}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


async def _problem(request: Request, exc: Problem) -> JSONResponse:
    return problem_response(exc.status, exc.detail, exc.errors, request.url.path, exc.headers, exc.code, exc.extra)


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return await _problem(request, validation_problem(exc))


async def _http(request: Request, exc: StarletteHTTPException) -> Response:
    if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI's 400 for a body whose client went away
        return await _client_gone(request, exc.__cause__)
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    errors = None
    if exc.status_code == 400:  # FastAPI's own answer to a body it cannot decode
        detail = "body: not valid JSON in UTF-8: send a JSON object"
        errors = [{"field": "body", "message": "not valid JSON in UTF-8"}]
    return problem_response(exc.status_code, detail, errors, request.url.path, dict(exc.headers or {}))


async def _invalid(request: Request, exc: InvalidRecordError) -> JSONResponse:
    return problem_response(422, str(exc), [{"field": "body", "message": exc.reason}], request.url.path)


async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
    return problem_response(404, str(exc), None, request.url.path)


async def _conflict(request: Request, exc: ConflictError) -> JSONResponse:
    return problem_response(409, str(exc), None, request.url.path)


async def _artifact(request: Request, exc: ArtifactError) -> JSONResponse:
    log.error("artifact error on %s: %s", request.url.path, exc)
    return problem_response(500, "a generation's files are missing or damaged; the service log says which",
                            None, request.url.path)


async def _database_unavailable(request: Request, exc: DatabaseUnavailableError) -> JSONResponse:
    # The message names the database's file or server: the log has it, the client hears what to do.
    if isinstance(exc, DatabaseBusyError):
        log.warning("%s %s refused: %s", request.method, request.url.path, exc)
        return problem_response(503, "the database is busy with another writer and nothing of this request was "
                                "stored: retry shortly", None, request.url.path,
                                {"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)})
    log.error("%s %s refused: %s", request.method, request.url.path, exc)
    if isinstance(exc, DatabaseFullError):
        return problem_response(507, "the database has no room left (its disk is full) and nothing of this request "
                                "was stored: the service log says where to free space", None, request.url.path)
    return problem_response(503, "the database cannot take writes (it is read-only) and nothing of this request "
                            "was stored: the service log says which file", None, request.url.path)


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    """The client closed the connection before its request was answered (mid-body, or while a chat generated):
    no one hears an answer, so it is counted as nginx's 499 "client closed request", not as an error."""
    log.info("%s %s: the client went away before the answer", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _selftune(request: Request, exc: SelftuneError) -> JSONResponse:
    return problem_response(400, str(exc), None, request.url.path)


def unexpected_error_response(request: Request, exc: Exception) -> JSONResponse:
    """The 500 for an exception no handler took: logged with an incident id, told without internals."""
    incident = uuid.uuid4().hex[:12]
    log.error("unexpected error %s on %s %s", incident, request.method, request.url.path, exc_info=exc)
    return problem_response(500, f"internal error (incident {incident}; the service log has the details)",
                            None, request.url.path)


HANDLERS: dict[type[Exception], Any] = {
    Problem: _problem, RequestValidationError: _validation, StarletteHTTPException: _http,
    InvalidRecordError: _invalid, NotFoundError: _not_found, ConflictError: _conflict, ArtifactError: _artifact,
    DatabaseUnavailableError: _database_unavailable, SelftuneError: _selftune, ClientDisconnect: _client_gone,
}
"""Each exception type and its problem+json answer; Starlette picks the handler of the nearest base class.
Any other exception is a 500 from ``middleware.UnexpectedErrors``, not from a handler here: Starlette's
catch-all re-raises after answering, and the server then drops the keep-alive connection."""


def install_problem_handlers(app: FastAPI) -> None:
    for exc_type, handler in HANDLERS.items():
        app.add_exception_handler(exc_type, handler)


def _field_name(loc: Any) -> str:
    """Pydantic's error location as a field path: ("body", "messages", 0, "content") -> "messages[0].content"."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")] or list(loc[:1]) or ["body"]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
