"""ASGI middleware of the API: the body limit, request metrics, refusing writes while stopping, and the 500."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from selftune.daemon.context import Context
from selftune.daemon.http.errors import Problem, problem_response, unexpected_error_response
from selftune.daemon.http.state import ServiceState
from selftune.daemon.service.metrics import Metrics


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
    """While the service stops (``state.accepting`` False), refuse new writes with 503 + Retry-After."""

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.state.accepting and scope["method"] not in ("GET", "HEAD"):
            response = problem_response(503, "the service is shutting down: retry shortly", None, scope.get("path"),
                                        {"Retry-After": "5", "Connection": "close"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class UnexpectedErrors:
    """Answer an exception that no handler took with a 500 problem, and keep the connection open.

    Starlette's own last resort answers and then re-raises, so that uvicorn closes the keep-alive
    connection: the client's next request on it (httpx, and so the `openai` client) then fails.
    Outermost, so that it covers the other middleware too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:  # part of a response is out: only closing the connection can tell the client
                raise
            await unexpected_error_response(Request(scope), exc)(scope, receive, send)
