"""Bearer tokens (``selftune token create``): ``ingest`` may send interactions, feedback and chat requests
(and list the models); ``admin`` may do everything. A browser signs in once for the HTML pages.

Only the health and metrics endpoints and the OpenAPI document are open (the service binds 127.0.0.1
by default).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Literal

import anyio
from fastapi import Depends, Request, Security
from fastapi.responses import RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from selftune.policies.records import ApiToken

from selftune.daemon.context import Context
from selftune.daemon.http.errors import Problem
from selftune.daemon.http.state import StateDep

_bearer = HTTPBearer(auto_error=False, description="A token from `selftune token create --scope ingest|admin`.")
COOKIE = "selftune_token"
"""A browser's token for the HTML pages: set by ``GET /v1/lineage?token=...`` (the sign-in, the only place a
``?token=`` counts: tokens in URLs end up in logs and histories), honoured on GET requests only (HttpOnly,
SameSite=Strict), so that the page's links to reports open in the same browser."""


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


def require(scope: Literal["ingest", "admin"], *, sign_in: bool = False) -> Callable[..., Awaitable[ApiToken]]:
    """A dependency that admits a live token of ``scope`` (an admin token is admitted everywhere).
    With ``sign_in`` (the lineage page) a browser may also send it as ``?token=``."""

    async def dependency(request: Request, state: StateDep,
                         credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]) -> ApiToken:
        secret = _secret(request, credentials, sign_in)
        token = await anyio.to_thread.run_sync(_verify, state.context, secret)
        if scope == "admin" and token.scope != "admin":
            raise Problem(403, f"token {token.name!r} has scope {token.scope!r}; this endpoint needs an admin token")
        if sign_in and secret == request.query_params.get("token"):
            request.state.signed_in = secret  # this very string was checked: it may go into the cookie
        return token

    return dependency


def _secret(request: Request, credentials: HTTPAuthorizationCredentials | None, sign_in: bool) -> str | None:
    """The bearer token; on GET also the browser's cookie, or on the sign-in page a ``?token=`` (nothing that a
    write could ride on)."""
    if credentials is not None:
        return credentials.credentials if credentials.scheme.lower() == "bearer" else None
    if request.method not in ("GET", "HEAD"):
        return None
    return (request.query_params.get("token") if sign_in else None) or request.cookies.get(COOKIE)


Ingest = Annotated[ApiToken, Depends(require("ingest"))]
Admin = Annotated[ApiToken, Depends(require("admin"))]
AdminSignIn = Annotated[ApiToken, Depends(require("admin", sign_in=True))]
"""``Admin`` for the lineage page, where a browser signs in with ``?token=``."""


def sign_in_token(request: Request) -> str | None:
    """The ``?token=`` a browser signed in with, if the page's dependency (``AdminSignIn``) checked that very
    token; None otherwise (e.g. a valid Authorization header beside a ``?token=`` nobody checked)."""
    return getattr(request.state, "signed_in", None)


def signed_in_redirect(request: Request, secret: str, to: str) -> RedirectResponse:
    """Keep a browser's token in a cookie, and out of the address bar and history: 303 to ``to``."""
    response = RedirectResponse(to, status_code=303)
    response.set_cookie(COOKIE, secret, httponly=True, samesite="strict", path="/v1",
                        secure=request.url.scheme == "https")
    return response
