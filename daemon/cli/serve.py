"""CLI commands ``selftune serve`` and ``selftune token create|list|revoke``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from selftune.policies.records import TOKEN_SCOPES, ApiToken

from selftune.daemon.cli.common import JsonOption, console, err, fail, open_context, print_json


def serve(ctx: typer.Context,
          host: Annotated[str | None, typer.Option(help="Address to bind (default: server.host, 127.0.0.1).")] = None,
          port: Annotated[int | None, typer.Option(help="TCP port (default: server.port, 8421).", min=1,
                                                   max=65535)] = None) -> None:
    """Run the service: the HTTP API (OpenAI-compatible chat included) and the cycle scheduler."""
    context = open_context(ctx)  # a wrong --state or configuration fails before the slow imports
    from selftune.daemon.service.lifecycle import run_service  # the HTTP app and uvicorn: slow to import

    code = run_service(context, host or context.config.server.host, port or context.config.server.port)
    raise typer.Exit(code)


token_app = typer.Typer(help="API tokens: ingest (send interactions, feedback, chat) or admin (everything).",
                        no_args_is_help=True)


@token_app.command("create")
def create_token(ctx: typer.Context,
                 scope: Annotated[str, typer.Option(help=f"What the token may do: {' or '.join(TOKEN_SCOPES)}.")],
                 name: Annotated[str | None, typer.Option(help="A name to recognise it by "
                                                               "(default: SCOPE-DATE).")] = None,
                 as_json: JsonOption = False) -> None:
    """Create a token and print it, once, as the last word of the output (only its hash is stored)."""
    if scope not in TOKEN_SCOPES:
        fail(f"--scope {scope!r}: use one of {', '.join(TOKEN_SCOPES)}", code=2)
    context = open_context(ctx)
    label = name or f"{scope}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    with context.store.transaction(write=True) as tx:
        token, secret = tx.tokens.create(label, scope)
    if as_json:
        print_json({**_token_row(token), "token": secret})
        return
    err.print(f"created {scope} token {token.id} ({token.name}); it is shown once, store it now:", highlight=False)
    print(secret)


@token_app.command("list")
def list_tokens(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Every token: id, name, scope, created, revoked (never the secret)."""
    with open_context(ctx).store.transaction() as tx:
        tokens = tx.tokens.list()
    rows = [_token_row(t) for t in tokens]
    if as_json:
        print_json(rows)
        return
    table = Table(title="API tokens")
    for column in ("id", "name", "scope", "created", "revoked"):
        table.add_column(column)
    for row in rows:
        revoked = (row["revoked_at"] or "-")[:19]
        table.add_row(str(row["id"]), row["name"], row["scope"], row["created_at"][:19], revoked)
    console.print(table)


def _token_row(token: ApiToken) -> dict[str, Any]:
    return {"id": token.id, "name": token.name, "scope": token.scope, "created_at": token.created_at.isoformat(),
            "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None}


@token_app.command("revoke")
def revoke_token(ctx: typer.Context,
                 token_id: Annotated[int, typer.Argument(help="Token id (token list shows them).")]) -> None:
    """Revoke a token: requests with it are refused from now on."""
    with open_context(ctx).store.transaction(write=True) as tx:
        token = tx.tokens.revoke(token_id)
    console.print(f"revoked {token.scope} token {token.id} ({token.name})")
