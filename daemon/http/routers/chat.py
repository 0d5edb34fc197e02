"""OpenAI-compatible chat completions, streamed or not, by the generation the request's ``model`` names.

``model`` is any name ``service.models`` resolves (``GET /v1/models`` lists them): a branch (its
champion), ``branch@champion``, ``branch@challenger``, ``branch@<generation id>``, or ``auto`` (the
router chooses). Every response says who answered: ``model`` is the concrete ``branch@<id>``,
``system_fingerprint`` is ``generation-<id>``, and the headers ``X-Selftune-Branch``,
``X-Selftune-Generation`` and ``X-Selftune-Route`` (pinned, routed or deferred) come before the first
byte of a stream too. Each exchange is logged as an interaction on the branch that answered, with
``{"route": ...}`` (``Target.record``) in its metadata, so that feedback can follow: a response's ``id`` is the
``chatcmpl-...`` id it is logged under (streamed or not), ``interaction_id`` (and, for a plain response, the header
``X-Selftune-Interaction``) the interaction's number; the feedback endpoint takes either. Generation is
blocking torch work: it runs in worker threads (at most ``GENERATION_THREADS`` at once), never on the
event loop.

What a request leaves unsaid of ``temperature`` and ``top_p`` the answering generation's
``generation_config.json`` says, else ``[server]`` does (vLLM's order). A client that goes away, streamed or
not, stops generation at the next token; what was generated is logged with ``finish_reason``
"client_disconnected" in its metadata, which selection never trains on.

As OpenAI does, a request this route cannot take is a 400 naming the field (pydantic's checks included), with
OpenAI's ``code`` where it has one; a parameter that would change the answer in a way selftune does not
implement (``UNSUPPORTED``) is such a request, not silently ignored. ``logprobs`` are the model's own
log-probabilities of the answer's tokens (before temperature and top-p), in OpenAI's shape; a stream carries
them in its last chunk, as they are read once generation ends.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import anyio
import orjson
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from selftune.policies.errors import InvalidRecordError
from selftune.policies.ingest import TOOL_KEYS, RowDefaults, parse_row
from selftune.policies.records import InteractionIn
from selftune.policies.selection import CLIENT_DISCONNECTED, SELF_GENERATED_SOURCE

from selftune.daemon.context import Context
from selftune.daemon.http.auth import Ingest
from selftune.daemon.http.errors import Problem, invalid, validation_problem
from selftune.daemon.http.routers.generations import model_not_found
from selftune.daemon.http.schemas import ChatCompletionRequest
from selftune.daemon.http.state import ServiceState, StateDep
from selftune.daemon.service.models import ModelNotFoundError, Target
from selftune.daemon.service.pool import Completion, LoadedGeneration, TokenLogprob
from selftune.daemon.service.sampling import SamplingParams
from selftune.daemon.views import CHAT_ID_PREFIX

log = logging.getLogger(__name__)
MAX_WAITING_GENERATIONS = 32
"""Chat requests queued behind the ones generating; more are refused with 503 and Retry-After."""

UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "logit_bias": ({},), "presence_penalty": (0,), "frequency_penalty": (0,),
}
"""OpenAI parameters selftune does not implement, and the values of each that ask for nothing (also null)."""


class OpenAIRoute(APIRoute):
    """A route of OpenAI's API: a request it cannot take is a 400, as OpenAI answers it (the service's other
    routes answer 422), FastAPI's own validation included."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Any:
            try:
                return await handle(request)
            except RequestValidationError as exc:
                problem = validation_problem(exc)
            except Problem as exc:
                problem = exc
            if problem.status == 422:
                problem.status = 400
            raise problem

        return handler


router = APIRouter(tags=["chat"], route_class=OpenAIRoute)


def _refuse_unsupported(request: ChatCompletionRequest) -> None:
    """A parameter that asks for what selftune does not do is an error naming it, never silently ignored."""
    extra = request.model_extra or {}
    for name, no_ops in UNSUPPORTED.items():
        if extra.get(name) is not None and extra[name] not in no_ops:
            raise invalid(name, f"is not supported by selftune ({extra[name]!r:.60}): remove it",
                          "unsupported_parameter")
    if request.n != 1:
        raise invalid("n", f"{request.n}: selftune answers with one choice per request: send n = 1 (or none)",
                      "unsupported_value")
    if request.top_logprobs is not None and not request.logprobs:
        raise invalid("top_logprobs", "needs logprobs: true", "invalid_value")


def _plain_messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    """The request's messages as {"role", "content"} strings (text parts joined; "developer" is "system")."""
    out = []
    for i, message in enumerate(request.messages):
        if used := [key for key in TOOL_KEYS if (message.model_extra or {}).get(key)]:
            raise invalid(f"messages[{i}].{used[0]}", "tool calls are not supported by selftune: remove them",
                          "unsupported_parameter")
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
        _exchange_row(context, request, messages, CHAT_ID_PREFIX + "check", Completion(".", "stop", 0, 0, 0, 0.0))
    except InvalidRecordError as exc:
        field = next((name for name in ("domain", "tags", "user") if exc.reason.startswith(f"'{name}'")), "messages")
        raise invalid(field, exc.reason) from None


def _sampling(context: Context, request: ChatCompletionRequest) -> SamplingParams:
    """The request's sampling, checked; what it leaves unsaid (None) the answering generation fills in."""
    server = context.config.server
    wanted = request.max_completion_tokens or request.max_tokens or server.default_max_tokens
    if wanted > server.max_tokens_limit:
        field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise invalid(field, f"{wanted} is over server.max_tokens_limit = {server.max_tokens_limit}")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > 4 or any(not s or len(s) > 200 for s in stops):
        raise invalid("stop", "give at most 4 non-empty stop strings of at most 200 characters")
    return SamplingParams(max_new_tokens=wanted, temperature=request.temperature, top_p=request.top_p,
                          stop=tuple(stops), seed=request.seed,
                          logprobs=(request.top_logprobs or 0) if request.logprobs else None)


def _exchange_row(context: Context, request: ChatCompletionRequest, messages: list[dict[str, str]],
                  external_id: str, completion: Completion, target: Target | None = None) -> InteractionIn:
    """The exchange as an interaction of the branch that answered (without a target, as a check: the default
    branch's), its routing record and its finish reason in the metadata (selection never trains on an answer
    whose client went away: ``metadata["finish_reason"] == "client_disconnected"``)."""
    row: dict[str, Any] = {"messages": [*messages, {"role": "assistant", "content": completion.text}],
                           "id": external_id, "generation": completion.generation_id,
                           "finish_reason": completion.finish_reason,
                           "usage": {"prompt_tokens": completion.prompt_tokens,
                                     "completion_tokens": completion.completion_tokens}}
    if target is not None:
        row["route"] = target.record()
    if request.domain is not None:
        row["domain"] = request.domain
    if request.tags is not None:
        row["tags"] = request.tags
    if request.user is not None:
        row["user"] = request.user
    branch = target.branch if target is not None else context.config.ingest.default_branch
    return parse_row(row, "openai", RowDefaults(branch=branch, source=SELF_GENERATED_SOURCE,
                                                max_message_chars=context.config.ingest.max_message_chars))


def _log_exchange(context: Context, request: ChatCompletionRequest, messages: list[dict[str, str]],
                  completion: Completion, external_id: str, target: Target) -> int | None:
    """Store the exchange as an interaction under its unique external id; its id, or None if it was not
    logged (an empty answer is no interaction)."""
    try:
        row = _exchange_row(context, request, messages, external_id, completion, target)
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


def _logprobs(completion: Completion) -> dict[str, Any] | None:
    """OpenAI's ``choices[0].logprobs``: each answer token, its log-probability and bytes, and the top ones."""
    def token(t: TokenLogprob) -> dict[str, Any]:
        return {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}

    if completion.logprobs is None:
        return None
    return {"content": [{**token(t), "top_logprobs": [token(top) for top in t.top]} for t in completion.logprobs],
            "refusal": None}


def fingerprint(target: Target) -> str:
    """OpenAI's ``system_fingerprint``: the generation that answered."""
    return f"generation-{target.generation_id}"


def provenance_headers(target: Target) -> dict[str, str]:
    """Which generation answers, and how it was chosen: on every chat response, streamed ones too."""
    return {"X-Selftune-Branch": target.branch, "X-Selftune-Generation": str(target.generation_id),
            "X-Selftune-Route": target.route}


def _count_completion(state: ServiceState, target: Target, completion: Completion, stream: bool) -> None:
    metrics, branch = state.metrics, target.branch
    metrics.completions.labels(branch, str(stream).lower()).inc()
    metrics.model_requests.labels(branch, str(target.generation_id), target.route).inc()
    metrics.completion_tokens.labels(branch).inc(completion.completion_tokens)
    metrics.prompt_tokens.labels(branch).inc(completion.prompt_tokens)
    metrics.completion_seconds.labels(branch).observe(completion.seconds)


@dataclass(frozen=True)
class _Exchange:
    """One chat completion on its way: the request, who answers it, and its prompt in that model's tokens."""

    body: ChatCompletionRequest
    messages: list[dict[str, str]]
    target: Target
    model: LoadedGeneration
    prompt_ids: list[int]
    params: SamplingParams
    external_id: str

    def answer(self, context: Context, gone: threading.Event,
               on_text: Callable[[str], None] | None = None) -> tuple[Completion, int | None]:
        """Generate the answer and log the exchange (blocking: one worker thread does both, so that an answer is
        logged even when no one is left to await it). ``gone`` set (the client went away) stops generation at the
        next token; what was generated is logged with the finish reason ``CLIENT_DISCONNECTED``. The first tokens
        the router generated with this model (its deferral check) start the answer, streamed first."""
        draft = self.target.decision.draft if self.target.decision is not None else None
        completion = self.model.generate(self.prompt_ids, self.params, on_text, gone, draft)
        if gone.is_set():
            completion = replace(completion, finish_reason=CLIENT_DISCONNECTED)
        return completion, _log_exchange(context, self.body, self.messages, completion, self.external_id, self.target)


@router.post("/v1/chat/completions", summary="OpenAI-compatible chat completion by the generation `model` names",
             description="`model` is a branch (its champion answers), `branch@champion`, `branch@challenger`, "
                         "`branch@<generation id>`, or `auto` (the router chooses): GET /v1/models lists them, "
                         "and an unknown one is a 404 with code `model_not_found` listing the names that work. "
                         "The response's `model` is the generation that answered (`branch@<id>`), "
                         "`system_fingerprint` is `generation-<id>`, and the headers X-Selftune-Branch, "
                         "X-Selftune-Generation and X-Selftune-Route (pinned, routed or deferred) say the same, "
                         "streamed or not. The exchange is logged as an interaction of the branch that answered, "
                         "with the routing decision in its metadata (`route`): the response `id` is the "
                         "`chatcmpl-...` id it is logged under, `interaction_id` (and the header "
                         "X-Selftune-Interaction) its number; feedback takes either "
                         "(POST /v1/interactions/{id}/feedback). With `stream: true` the answer comes as "
                         "server-sent events with the same `id`, and the last event carries `interaction_id` (and "
                         "the `logprobs`, if asked for). A request it cannot take is a 400 naming the field, with "
                         "OpenAI's `code` where it has one; `tools`, `response_format`, `logit_bias`, penalties "
                         "and `n` > 1 are not implemented, and refused by name.")
async def chat_completions(request: Request, response: Response, state: StateDep, body: ChatCompletionRequest,
                           token: Ingest) -> Any:
    context = state.context
    _refuse_unsupported(body)
    messages = _plain_messages(body)
    _check_conversation(context, body, messages)
    params = _sampling(context, body)
    limiter = state.generation_limiter
    if limiter.statistics().tasks_waiting >= MAX_WAITING_GENERATIONS:
        raise Problem(503, "too many chat completions are waiting: retry shortly", headers={"Retry-After": "2"})
    await anyio.to_thread.run_sync(context.store.check_writable)  # a locked database: 503 now, not after generating
    try:
        target, model = await anyio.to_thread.run_sync(state.pool.serve, body.model, messages)
    except ModelNotFoundError as exc:
        raise model_not_found(exc) from exc
    try:
        prompt_ids = await anyio.to_thread.run_sync(model.prompt_ids, messages)
        model.budget(len(prompt_ids), params.max_new_tokens)
    except InvalidRecordError as exc:
        raise invalid("messages", exc.reason, "context_length_exceeded") from None
    params = model.sampling_defaults.fill(params, context.config.server)
    exchange = _Exchange(body, messages, target, model, prompt_ids, params, f"{CHAT_ID_PREFIX}{uuid.uuid4().hex}")
    if body.stream:
        return StreamingResponse(_stream(state, exchange), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          **provenance_headers(target)})
    gone = threading.Event()
    async with anyio.create_task_group() as watching:
        watching.start_soon(_set_when_disconnected, request, gone)
        completion, interaction_id = await anyio.to_thread.run_sync(exchange.answer, context, gone, limiter=limiter)
        watching.cancel_scope.cancel()
    if completion.finish_reason == CLIENT_DISCONNECTED:
        raise ClientDisconnect  # no one to answer: counted as 499 (errors._client_gone)
    _count_completion(state, target, completion, stream=False)
    response.headers.update(provenance_headers(target))
    if interaction_id is not None:
        response.headers["X-Selftune-Interaction"] = str(interaction_id)
    return {"id": exchange.external_id, "object": "chat.completion", "created": int(time.time()), "model": target.name,
            "system_fingerprint": fingerprint(target), "interaction_id": interaction_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                         "finish_reason": completion.finish_reason, "logprobs": _logprobs(completion)}],
            "usage": _usage(completion)}


async def _set_when_disconnected(request: Request, gone: threading.Event) -> None:
    """Set ``gone`` when the client closes the connection (its body is read: the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.set()


_DONE = object()


async def _stream(state: ServiceState, exchange: _Exchange) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's chunk format; generation runs in a thread and hands text over a queue."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[Any] = asyncio.Queue()
    gone = threading.Event()
    created = int(time.time())
    target = exchange.target

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: dict[str, Any] | None = None,
              **extra: Any) -> bytes:
        document = {"id": exchange.external_id, "object": "chat.completion.chunk", "created": created,
                    "model": target.name, "system_fingerprint": fingerprint(target),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}], **extra}
        return b"data: " + orjson.dumps(document) + b"\n\n"

    def hand_over(piece: str) -> None:  # called in the generating thread
        loop.call_soon_threadsafe(pieces.put_nowait, piece)

    def generate() -> tuple[Completion, int | None]:
        try:
            return exchange.answer(state.context, gone, hand_over)
        finally:
            loop.call_soon_threadsafe(pieces.put_nowait, _DONE)

    worker = asyncio.ensure_future(anyio.to_thread.run_sync(generate, limiter=state.generation_limiter))
    try:
        yield chunk({"role": "assistant", "content": ""})
        while (piece := await pieces.get()) is not _DONE:
            yield chunk({"content": piece})
        try:
            completion, interaction_id = await worker
        except Exception as exc:  # noqa: BLE001 - the headers are out: report in the stream, as OpenAI does
            log.error("streamed completion %s failed", exchange.external_id, exc_info=exc)
            error = {"error": {"message": "generation failed; the service log has the details", "type": "server_error"}}
            yield b"data: " + orjson.dumps(error) + b"\n\n"
            return
        _count_completion(state, target, completion, stream=True)
        options = exchange.body.stream_options
        include_usage = options is not None and options.include_usage
        yield chunk({}, completion.finish_reason, _logprobs(completion), interaction_id=interaction_id,
                    **({"usage": _usage(completion)} if include_usage else {}))
        yield b"data: [DONE]\n\n"
    finally:
        gone.set()  # the client went away (or we are done): stop generating, log what there is
