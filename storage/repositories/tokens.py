"""API tokens: stored as SHA-256 hashes; the plaintext is handed out once, at creation."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from sqlalchemy import Row, select, update

from selftune.policies.errors import InvalidRecordError, NotFoundError
from selftune.policies.records import TOKEN_SCOPES, ApiToken

from .. import models as m
from .base import Repository

TOKEN_PREFIX = "st_"


def hash_token(plaintext: str) -> str:
    """SHA-256 hex of a token. Tokens are 256-bit random, so a fast unsalted hash is the right tool."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def _to_token(row: Row[Any]) -> ApiToken:
    return ApiToken(id=row.id, name=row.name, scope=row.scope, created_at=row.created_at, revoked_at=row.revoked_at)


class SqlTokenRepository(Repository):
    table = m.api_tokens

    def create(self, name: str, scope: str) -> tuple[ApiToken, str]:
        """A new token: the record and the plaintext, which is shown once and never stored."""
        if scope not in TOKEN_SCOPES:
            raise InvalidRecordError(f"token scope {scope!r}: use one of {', '.join(TOKEN_SCOPES)}")
        plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
        values = {"name": name, "scope": scope, "token_hash": hash_token(plaintext), "created_at": self.clock()}
        token_id = self.connection.execute(self.table.insert().returning(self.table.c.id), values).scalar_one()
        return ApiToken(id=token_id, name=name, scope=scope, created_at=values["created_at"]), plaintext

    def verify(self, plaintext: str) -> ApiToken | None:
        """The live token whose secret this is, or None (unknown or revoked)."""
        digest = hash_token(plaintext)
        row = self.connection.execute(select(self.table).where(self.table.c.token_hash == digest)).first()
        # The lookup is by hash, so it leaks nothing about the secret; compare_digest guards the final
        # check anyway (and answers the same for "unknown" and "revoked" in kind, if not in time).
        if row is None or not hmac.compare_digest(row.token_hash, digest) or row.revoked_at is not None:
            return None
        return _to_token(row)

    def revoke(self, token_id: int) -> ApiToken:
        """Revoke a token (again is a no-op that keeps the first revocation time)."""
        t = self.table
        self.connection.execute(
            update(t).where(t.c.id == token_id, t.c.revoked_at.is_(None)).values(revoked_at=self.clock())
        )
        row = self.connection.execute(select(t).where(t.c.id == token_id)).first()
        if row is None:
            raise NotFoundError(f"API token {token_id} does not exist (selftune token list shows them)")
        return _to_token(row)

    def list(self) -> list[ApiToken]:
        return [_to_token(row) for row in self.connection.execute(select(self.table).order_by(self.table.c.id))]
