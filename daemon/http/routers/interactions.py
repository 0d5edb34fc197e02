"""Interactions and their feedback: ingest (one row or a batch, in any ingest format), read, list.

Bodies are read raw and parsed by ``policies.ingest`` (the parser of ``selftune ingest`` too), so a
batch with one bad row is refused whole, every bad row named, and nothing of it is written.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio
import orjson
from fastapi import APIRouter, Path, Query, Request

from selftune.policies.errors import ConflictError, InvalidRecordError
from selftune.policies.ingest import FORMATS, RowDefaults, parse_feedback, parse_row
from selftune.policies.records import InteractionIn
from selftune.storage.contracts import UnitOfWork

from selftune.daemon import views
from selftune.daemon.context import Context
from selftune.daemon.http.auth import Admin, Ingest
from selftune.daemon.http.errors import Problem, invalid
from selftune.daemon.http.schemas import FEEDBACK_BODY, INGEST_BODY, Int64, IngestResponse, Text
from selftune.daemon.http.state import StateDep
from selftune.daemon.lineage import domain_routes

router = APIRouter(tags=["interactions"])


def decode_json(body: bytes) -> Any:
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
    target = branch or context.config.ingest.default_branch
    with context.store.transaction() as tx:
        if tx.branches.find(target) is None:
            raise invalid("branch", f"no branch {target!r}: known branches are "
                                    f"{', '.join(b.name for b in tx.branches.list()) or 'none (run selftune init)'}")
    defaults = RowDefaults(branch=target, domain=domain, source="api",
                           max_message_chars=context.config.ingest.max_message_chars,
                           routes={} if branch else domain_routes(context))
    rows, single = parse_rows(decode_json(body), fmt, defaults, context.config.server.max_batch_rows)
    with context.store.transaction(write=True) as tx:
        result = tx.interactions.add_batch(rows)
        if result.conflicts:  # raised inside the transaction: nothing of the body is written
            raise ConflictError(f"{result.conflicts} row(s) reuse a stored id with other messages, nothing was "
                                f"written: {', '.join(map(repr, result.conflict_ids))}; the stored rows stay: give "
                                "an edited row a new id (feedback on a stored row needs its messages unchanged)")
        row_id = _single_row_id(tx, rows[0], result.accepted) if single else None
    return {"accepted": result.accepted, "duplicates": result.duplicates, "rejected": 0, "id": row_id}, rows[0].branch


def _single_row_id(tx: UnitOfWork, row: InteractionIn, accepted: int) -> int | None:
    """The id of the one row just written (or already there), looked up inside the writing transaction."""
    if row.external_id is not None:
        found = tx.interactions.find_by_external_id(row.branch, row.external_id)
        return None if found is None else found.id
    # Writers are serialised (SQLite's lock; an advisory lock on PostgreSQL), so inside this transaction
    # the branch's newest id is the row this transaction inserted.
    return tx.interactions.max_id(row.branch) if accepted else None


@router.post("/v1/interactions", response_model=IngestResponse, openapi_extra=INGEST_BODY,
             summary="Log interactions: one object or a list; OpenAI chat or preference, ShareGPT or prompt/response rows",
             description="Idempotent: a row with an `id` (external id) already stored on its branch, or the "
                         "same content without one, counts as a duplicate. A list with one invalid row is "
                         "refused whole (422, every bad row named) and nothing is written.")
async def post_interactions(
    request: Request, state: StateDep, token: Ingest,
    branch: Annotated[Text | None, Query(max_length=64, description="Branch [default: by domain route, "
                                                                    "else ingest.default_branch].")] = None,
    domain: Annotated[Text | None, Query(max_length=64, description="Domain of rows that name none.")] = None,
    format: Annotated[Literal[FORMATS], Query(description="Row format.")] = "auto",  # type: ignore[valid-type]
) -> dict[str, Any]:
    body = await request.body()
    result, target = await anyio.to_thread.run_sync(_ingest, state.context, body, branch, domain, format)
    counter = state.metrics.interactions
    counter.labels(target, "accepted").inc(result["accepted"])
    counter.labels(target, "duplicate").inc(result["duplicates"])
    return result


@router.post("/v1/interactions/{interaction_id}/feedback", status_code=201, openapi_extra=FEEDBACK_BODY,
             summary="Attach feedback to an interaction (or a chat completion id)")
async def post_feedback(request: Request, state: StateDep, token: Ingest,
                        interaction_id: Annotated[Text, Path(max_length=300)]) -> dict[str, Any]:
    value = decode_json(await request.body())
    try:
        items = parse_feedback(value)
    except InvalidRecordError as exc:
        raise invalid("body", exc.reason) from None
    if not items:
        raise invalid("body", "no feedback given: the list is empty")

    def store() -> list[dict[str, Any]]:
        with state.context.store.transaction(write=True) as tx:
            target = views.resolve_interaction(tx, interaction_id)
            return [views.feedback_view(tx.feedback.add(target, item)) for item in items]

    stored = await anyio.to_thread.run_sync(store)
    for item in stored:
        state.metrics.feedback.labels(item["kind"]).inc()
    return {"interaction_id": stored[0]["interaction_id"], "feedback": stored}


def page(views_: list[dict[str, Any]], limit: int, max_bytes: int) -> dict[str, Any]:
    """Up to ``limit`` views, stopping before their JSON passes ``max_bytes`` (one at least): a listing is
    bounded however large its rows and their feedback are, and ``next_after`` goes on where it stopped."""
    size, shown = 64, 0  # 64: room for the envelope
    for view in views_:
        size += len(orjson.dumps(view)) + 1
        if shown and size > max_bytes:
            break
        shown += 1
    data = views_[:shown]
    full = shown < len(views_) or shown == limit
    return {"data": data, "next_after": data[-1]["id"] if full else None}


@router.get("/v1/interactions", summary="Interactions in id order (keyset pagination)",
            description="A page holds up to `limit` interactions and at most server.max_body_bytes of JSON (one "
                        "interaction at least); `next_after` is set while there may be more.")
async def list_interactions(
    state: StateDep, token: Admin,
    branch: Annotated[Text | None, Query(max_length=64)] = None,
    domain: Annotated[Text | None, Query(max_length=64)] = None,
    after: Annotated[Int64 | None, Query(ge=0, description="Only ids above this: pass `next_after`.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.context.store.transaction() as tx:
            rows = tx.interactions.list(branch=branch, domain=domain, after_id=after, limit=limit)
            feedback = tx.feedback.for_interactions([r.id for r in rows])
        return page([views.interaction_view(r, feedback.get(r.id)) for r in rows], limit,
                    state.context.config.server.max_body_bytes)

    return await anyio.to_thread.run_sync(read)


@router.get("/v1/interactions/{interaction_id}", summary="One interaction with its feedback")
async def get_interaction(state: StateDep, token: Admin,
                          interaction_id: Annotated[Text, Path(max_length=300)]) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with state.context.store.transaction() as tx:
            found = tx.interactions.get(views.resolve_interaction(tx, interaction_id))
            return views.interaction_view(found, tx.feedback.for_interaction(found.id))

    return await anyio.to_thread.run_sync(read)
