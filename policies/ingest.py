"""Turning one decoded input row into a validated ``InteractionIn``: formats, detection, checks.

Four formats, detected per row by their keys or forced with ``fmt``:
- ``openai``: ``{"messages": [{"role": ..., "content": ..., "weight"?: 0|1}, ...]}``, as OpenAI's fine-tuning files
  have them: ``developer`` is read as ``system``, list-form content as its text parts joined, and ``weight: 0`` on
  an assistant message keeps that turn out of the training labels (weight 1, the default, is not stored). Tool
  calls are refused, naming the message: selftune does not train on tool use.
- ``preference``: OpenAI's preference rows, ``{"input": {"messages": [...]}, "preferred_output": [assistant
  message], "non_preferred_output": [assistant message]}``: the input and the preferred answer are the
  interaction, and the pair is its ``preference`` feedback (chosen/rejected).
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``
- ``prompt``: ``{"prompt": ..., "response": ..., "system"?: ...}``
Every format also takes ``id`` (or ``external_id``), ``domain``, ``tags`` and ``feedback``; other
fields are kept in ``metadata``.

Whatever is accepted can be stored and answered back on every backend: no text holds a NUL (PostgreSQL
cannot store one) or a lone surrogate (not valid Unicode, so not UTF-8), metadata integers fit in 64 bits,
and metadata nests at most ``MAX_JSON_DEPTH`` levels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRecordError
from .records import ROLES, FeedbackIn, InteractionIn, Message

FORMATS: tuple[str, ...] = ("auto", "openai", "sharegpt", "prompt", "preference")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
OPENAI_ROLES = {**{role: role for role in ROLES}, "developer": "system"}
TOOL_ROLES = ("tool", "function")
TOOL_KEYS = ("tool_calls", "function_call")
COMMON_KEYS = {"id", "external_id", "domain", "tags", "feedback"}
FORMAT_KEYS = {"openai": {"messages"}, "sharegpt": {"conversations"}, "prompt": {"prompt", "response", "system"},
               "preference": {"input", "preferred_output", "non_preferred_output"}}
KNOWN_KEYS = {fmt: frozenset(COMMON_KEYS | keys) for fmt, keys in FORMAT_KEYS.items()}
MAX_ID_CHARS = 256
MAX_LABEL_CHARS = 64
MAX_FEEDBACK_ITEMS = 100
"""Feedback items in one request (or one row): each is stored as up to four feedback rows."""
MAX_JSON_DEPTH = 64
"""Levels of lists and objects in a metadata value. orjson, which stores rows and encodes answers, encodes at
most 254 levels, and an answer wraps a row's metadata in a few more; real metadata is a few levels deep."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""Integers that the database and every JSON reader hold exactly."""
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


@dataclass(frozen=True)
class RowDefaults:
    """What a row does not say for itself."""

    branch: str = "main"
    domain: str | None = None
    source: str = "ingest"
    max_message_chars: int = 200_000
    routes: Mapping[str, str] = field(default_factory=dict)
    """Domain -> branch: a row of a routed domain goes to that branch instead of ``branch``."""


def detect_format(row: dict[str, Any]) -> str:
    """The format of one row, by its keys; an error naming the keys it has if none fits."""
    if "messages" in row:
        return "openai"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row or "response" in row:
        return "prompt"
    if "preferred_output" in row or "non_preferred_output" in row:  # not "input" alone: Alpaca rows have one
        return "preference"
    raise InvalidRecordError(
        f"unknown row format with keys {sorted(row)[:8]}: expected 'messages' (OpenAI chat), "
        "'conversations' (ShareGPT), 'prompt' and 'response', or 'input' and 'preferred_output' (OpenAI preference)"
    )


def parse_row(row: Any, fmt: str = "auto", defaults: RowDefaults = RowDefaults()) -> InteractionIn:
    """Validate one decoded JSON value as an interaction; ``InvalidRecordError`` says what is wrong."""
    if not isinstance(row, dict):
        raise InvalidRecordError(f"expected a JSON object, got {type(row).__name__}")
    if fmt not in FORMATS:
        raise InvalidRecordError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    fmt = detect_format(row) if fmt == "auto" else fmt
    messages = _MESSAGE_READERS[fmt](row)
    _check_messages(messages, defaults.max_message_chars)
    extra_keys = row.keys() - KNOWN_KEYS[fmt]
    for key in extra_keys:
        _check_json(row[key], repr(key))
    domain = _label(row.get("domain", defaults.domain), "domain")
    feedback = parse_feedback(row["feedback"]) if row.get("feedback") is not None else ()
    if fmt == "preference":
        feedback += (_preference(row, messages[-1].content),)
    return InteractionIn(
        messages=messages,
        branch=defaults.routes.get(domain, defaults.branch) if domain else defaults.branch,
        domain=domain,
        tags=_tags(row["tags"]) if "tags" in row else (),
        external_id=_external_id(row.get("id", row.get("external_id"))),
        source=defaults.source,
        feedback=feedback,
        metadata={k: row[k] for k in sorted(extra_keys)} if extra_keys else {},
    )


def _openai_messages(row: dict[str, Any], name: str = "messages") -> tuple[Message, ...]:
    items = row.get("messages")
    if not isinstance(items, list):
        raise InvalidRecordError(f"'{name}' must be a list of {{\"role\", \"content\"}} objects")
    return tuple(_openai_message(m, i) for i, m in enumerate(items))


def _openai_message(item: Any, index: int) -> Message:
    """One OpenAI message: tool use refused by name, list-form content joined, ``weight`` checked."""
    if isinstance(item, dict) and (item.get("role") in TOOL_ROLES or any(item.get(k) for k in TOOL_KEYS)):
        what = f"role {item['role']!r}" if item.get("role") in TOOL_ROLES else \
            f"'{next(k for k in TOOL_KEYS if item.get(k))}'"
        raise InvalidRecordError(f"message {index} is a tool call or result ({what}): selftune does not train on "
                                 "tool use; drop the row, or its tool messages")
    if isinstance(item, dict) and isinstance(item.get("content"), list):
        item = {**item, "content": _text_parts(item["content"], f"message {index}")}
    message = _message(item, index, "role", "content", OPENAI_ROLES)
    weight = item.get("weight")
    if weight is None:
        return message
    if weight not in (0, 1) or isinstance(weight, bool) or message.role != "assistant":
        raise InvalidRecordError(f"message {index}: weight {weight!r} must be 0 (do not train on this turn) or 1, "
                                 "and only on an assistant message")
    return Message(message.role, message.content, 0) if weight == 0 else message


def _text_parts(parts: list[Any], where: str) -> str:
    """List-form content (``[{"type": "text", "text": ...}, ...]``) as its text; other parts are refused."""
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else _kind(part)
            raise InvalidRecordError(f"{where}: content part {j} is {kind!r}: only text parts "
                                     "({\"type\": \"text\", \"text\": ...}) are supported")
    return "".join(part["text"] for part in parts)


def _preference_messages(row: dict[str, Any]) -> tuple[Message, ...]:
    """The input's messages and the preferred answer."""
    if not isinstance(row.get("input"), dict):
        raise InvalidRecordError(f"'input' must be an object with 'messages', got {_kind(row.get('input'))}")
    prompt = _openai_messages(row["input"], "input.messages")
    return prompt + (_single_answer(row, "preferred_output"),)


def _single_answer(row: dict[str, Any], key: str) -> Message:
    value = row.get(key)
    if not isinstance(value, list) or len(value) != 1:
        raise InvalidRecordError(f"'{key}' must be a list of one assistant message, got {_kind(value)}")
    try:
        message = _openai_message(value[0], 0)
    except InvalidRecordError as exc:
        raise InvalidRecordError(f"'{key}': {exc.reason}") from None
    if message.role != "assistant" or not message.content.strip():
        raise InvalidRecordError(f"'{key}' must hold a non-empty assistant message, got role {message.role!r}")
    return message


def _preference(row: dict[str, Any], chosen: str) -> FeedbackIn:
    rejected = check_text(_single_answer(row, "non_preferred_output").content, "'non_preferred_output'")
    return FeedbackIn("preference", chosen=chosen, rejected=rejected)


def _sharegpt_messages(row: dict[str, Any]) -> tuple[Message, ...]:
    items = row.get("conversations")
    if not isinstance(items, list):
        raise InvalidRecordError("'conversations' must be a list of {\"from\", \"value\"} objects")
    return tuple(_message(m, i, "from", "value", SHAREGPT_ROLES) for i, m in enumerate(items))


def _prompt_messages(row: dict[str, Any]) -> tuple[Message, ...]:
    for key in ("prompt", "response"):
        if not isinstance(row.get(key), str):
            raise InvalidRecordError(f"'{key}' must be a string, got {_kind(row.get(key))}")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise InvalidRecordError(f"'system' must be a string, got {_kind(system)}")
    head = (Message("system", system),) if system else ()
    return head + (Message("user", row["prompt"]), Message("assistant", row["response"]))


_MESSAGE_READERS = {"openai": _openai_messages, "sharegpt": _sharegpt_messages, "prompt": _prompt_messages,
                    "preference": _preference_messages}


def _message(item: Any, index: int, role_key: str, content_key: str, role_map: dict[str, str] | None) -> Message:
    if not isinstance(item, dict):
        raise InvalidRecordError(f"message {index} must be an object, got {_kind(item)}")
    role, content = item.get(role_key), item.get(content_key)
    known = role_map or {r: r for r in ROLES}
    if not isinstance(role, str) or role not in known:
        raise InvalidRecordError(f"message {index}: {role_key} {role!r} is not one of {', '.join(sorted(known))}")
    if not isinstance(content, str):
        raise InvalidRecordError(f"message {index}: '{content_key}' must be a string, got {_kind(content)}")
    return Message(known[role], content)


def _check_messages(messages: tuple[Message, ...], max_chars: int) -> None:
    if not any(m.role == "user" for m in messages):
        raise InvalidRecordError("no user message: an interaction needs a prompt")
    if messages[-1].role != "assistant" or not messages[-1].content.strip():
        raise InvalidRecordError("the last message must be a non-empty assistant response")
    if all(m.weight == 0 for m in messages if m.role == "assistant"):
        raise InvalidRecordError("every assistant message has weight 0: the row has nothing to train on")
    for i, m in enumerate(messages):
        if len(m.content) > max_chars:
            raise InvalidRecordError(
                f"message {i} has {len(m.content)} characters, over ingest.max_message_chars = {max_chars}"
            )
        check_text(m.content, f"message {i}")


def check_text(text: str, name: str = "the text") -> str:
    """``text`` if it can be stored as it is; else an error naming ``name``, the character and where it is."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return text
    what = "a NUL character (\\u0000), which PostgreSQL cannot store" if found.group() == "\x00" else \
        f"a lone surrogate (\\u{ord(found.group()):04x}), which is not valid Unicode"
    raise InvalidRecordError(f"{name} has {what}, at position {found.start()}: remove it")


def _check_json(value: Any, root: str, path: str = "", depth: int = 0) -> None:
    """A metadata value: nested at most MAX_JSON_DEPTH levels, its text storable, its integers 64-bit."""
    if isinstance(value, str):
        check_text(value, root + path)
    elif isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        raise InvalidRecordError(f"{root + path} = {value} is not a 64-bit integer: send it as a string")
    elif isinstance(value, dict | list):
        if depth == MAX_JSON_DEPTH:
            raise InvalidRecordError(f"{root} is nested over {MAX_JSON_DEPTH} levels deep: flatten it")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                check_text(key, f"{root + path} key {key!r:.40}")
            _check_json(item, root, f"{path}[{key!r:.40}]", depth + 1)


def _external_id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidRecordError(f"'id' must be a string or an integer, got {_kind(value)}")
    text = str(value)
    if not text or len(text) > MAX_ID_CHARS:
        raise InvalidRecordError(f"'id' {text[:40]!r} must have 1 to {MAX_ID_CHARS} characters")
    return check_text(text, "'id'")


def _label(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_LABEL_CHARS:
        raise InvalidRecordError(f"'{name}' must be a string of 1 to {MAX_LABEL_CHARS} characters, got {value!r:.60}")
    return check_text(value, f"'{name}'")


def _tags(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) and 0 < len(t) <= MAX_LABEL_CHARS for t in value):
        raise InvalidRecordError(f"'tags' must be a list of short strings, got {value!r:.60}")
    return tuple(check_text(tag, f"'tags' item {i}") for i, tag in enumerate(value))


THUMBS = {"up": True, "thumbs_up": True, "down": False, "thumbs_down": False}


def parse_feedback(value: Any) -> tuple[FeedbackIn, ...]:
    """Feedback in any of its shapes: "up"/"down", true/false, a score, an object, or a list of these.

    An object may hold ``thumbs`` ("up"/"down"/bool), ``score`` (number), ``correction`` (the
    corrected response), ``chosen`` + ``rejected`` (a preference pair) and ``comment``.
    """
    if isinstance(value, list):
        if len(value) > MAX_FEEDBACK_ITEMS:
            raise InvalidRecordError(f"{len(value)} feedback items is over {MAX_FEEDBACK_ITEMS}: send fewer at once")
        if any(isinstance(item, list) for item in value):
            raise InvalidRecordError("a feedback list holds items (thumbs, scores, objects), not lists")
        return tuple(f for item in value for f in parse_feedback(item))
    if isinstance(value, bool):
        return (FeedbackIn("thumbs", thumbs_up=value),)
    if isinstance(value, str):
        if value not in THUMBS:
            raise InvalidRecordError(f"feedback {value!r} is not one of {', '.join(THUMBS)}")
        return (FeedbackIn("thumbs", thumbs_up=THUMBS[value]),)
    if isinstance(value, int | float):
        return (_score(value),)
    if isinstance(value, dict):
        return _feedback_object(value)
    raise InvalidRecordError(f"feedback must be a string, boolean, number, object or list, got {_kind(value)}")


def _feedback_object(obj: dict[str, Any]) -> tuple[FeedbackIn, ...]:
    known = {"thumbs", "score", "correction", "corrected_response", "chosen", "rejected", "comment"}
    if unknown := sorted(set(obj) - known):
        raise InvalidRecordError(f"unknown feedback field(s) {unknown}: use {', '.join(sorted(known))}")
    comment = _optional_text(obj.get("comment"), "comment")
    out: list[FeedbackIn] = []
    if "thumbs" in obj:
        thumbs = obj["thumbs"]
        up = thumbs if isinstance(thumbs, bool) else THUMBS.get(thumbs) if isinstance(thumbs, str) else None
        if up is None:
            raise InvalidRecordError(f"feedback thumbs {thumbs!r} must be 'up', 'down', true or false")
        out.append(FeedbackIn("thumbs", thumbs_up=up, comment=comment))
    if "score" in obj:
        out.append(_score(obj["score"], comment))
    correction = obj.get("correction", obj.get("corrected_response"))
    if correction is not None:
        out.append(FeedbackIn("correction", corrected_response=_required_text(correction, "correction"), comment=comment))
    if "chosen" in obj or "rejected" in obj:
        out.append(FeedbackIn("preference", chosen=_required_text(obj.get("chosen"), "chosen"),
                              rejected=_required_text(obj.get("rejected"), "rejected"), comment=comment))
    if not out:
        raise InvalidRecordError("feedback object says nothing: give thumbs, score, correction or chosen+rejected")
    return tuple(out)


def _score(value: Any, comment: str | None = None) -> FeedbackIn:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value or abs(value) == float("inf"):
        raise InvalidRecordError(f"feedback score {value!r} must be a finite number")
    return FeedbackIn("score", score=float(value), comment=comment)


def _required_text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidRecordError(f"feedback '{name}' must be a non-empty string, got {_kind(value)}")
    return check_text(value, f"feedback '{name}'")


def _optional_text(value: Any, name: str) -> str | None:
    return None if value is None else _required_text(value, name)


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
