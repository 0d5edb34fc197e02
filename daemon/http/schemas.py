"""Request and response models of the API, as documented in its OpenAPI schema.

The ingest and feedback bodies are parsed by ``policies.ingest`` itself (one parser for files and the
API, every bad row named), so their models only document them: their roles, formats, thumbs and
feedback kinds are built from the parser's own constants, never typed out a second time.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

from selftune.policies.ingest import (
    INT64_MAX,
    INT64_MIN,
    MAX_FEEDBACK_ITEMS,
    MAX_ID_CHARS,
    MAX_LABEL_CHARS,
    OPENAI_ROLES,
    SHAREGPT_ROLES,
    THUMBS,
    check_text,
)
from selftune.policies.records import FEEDBACK_KINDS, ROLES

Role = Literal[ROLES]  # type: ignore[valid-type]
OpenAIRole = Literal[tuple(OPENAI_ROLES)]  # type: ignore[valid-type]
ShareGptRole = Literal[tuple(SHAREGPT_ROLES)]  # type: ignore[valid-type]
Thumbs = Literal[tuple(THUMBS)]  # type: ignore[valid-type]
Text = Annotated[str, AfterValidator(check_text)]
"""Text that every backend can store: no NUL, no lone surrogate (the ingest parser's own check)."""
Label = Annotated[Text, Field(min_length=1, max_length=MAX_LABEL_CHARS)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


# -- ingest and feedback bodies (documentation of what policies.ingest accepts) -------------------------


class FeedbackObject(BaseModel):
    model_config = ConfigDict(extra="forbid", title="feedback object")
    thumbs: Thumbs | bool | None = None
    score: float | None = None
    correction: str | None = Field(None, description="The corrected response (also `corrected_response`).")
    corrected_response: str | None = None
    chosen: str | None = Field(None, description="A preference pair: with `rejected`.")
    rejected: str | None = None
    comment: str | None = None


FeedbackItem = Thumbs | bool | float | FeedbackObject
Feedback = Annotated[FeedbackItem | Annotated[list[FeedbackItem], Field(max_length=MAX_FEEDBACK_ITEMS)], Field(
    description=f"Thumbs ({', '.join(map(repr, THUMBS))}, true/false), a score, an object, or a list of at most "
                f"{MAX_FEEDBACK_ITEMS} of these; "
                f"each is stored as one of the feedback kinds {', '.join(FEEDBACK_KINDS)}.")]


class _RowFields(BaseModel):
    """What every row format takes besides its messages; other fields are kept as metadata."""

    model_config = ConfigDict(extra="allow")
    id: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)] | int | None = Field(
        None, description="External id (also `external_id`): a row whose id is already stored on its branch is a "
                          "duplicate.")
    external_id: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)] | int | None = None
    domain: Label | None = None
    tags: list[Label] | None = None
    feedback: Feedback | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatTurn(BaseModel):
    role: OpenAIRole = Field(description="\"developer\" is read as \"system\"; tool calls are refused.")
    content: str | list[ContentPart] = Field(description="Text, or text parts (joined).")
    weight: Literal[0, 1] | None = Field(None, description="On an assistant message: 0 keeps the turn out of "
                                                           "training (OpenAI fine-tuning's weight).")


class OpenAIRow(_RowFields):
    model_config = ConfigDict(title="OpenAI chat")
    messages: list[ChatTurn]


class PreferenceInput(BaseModel):
    model_config = ConfigDict(extra="allow")
    messages: list[ChatTurn]


class PreferenceRow(_RowFields):
    model_config = ConfigDict(title="OpenAI preference")
    input: PreferenceInput = Field(description="The conversation up to the answer.")
    preferred_output: Annotated[list[ChatTurn], Field(min_length=1, max_length=1)] = Field(
        description="The better answer: stored as the interaction's answer and the preference's `chosen`.")
    non_preferred_output: Annotated[list[ChatTurn], Field(min_length=1, max_length=1)] = Field(
        description="The worse answer: the preference's `rejected`.")


class ShareGptTurn(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    from_: ShareGptRole = Field(alias="from")
    value: str


class ShareGptRow(_RowFields):
    model_config = ConfigDict(title="ShareGPT")
    conversations: list[ShareGptTurn]


class PromptRow(_RowFields):
    model_config = ConfigDict(title="prompt/response")
    prompt: str
    response: str
    system: str | None = None


ROW_MODELS: dict[str, type[_RowFields]] = {"openai": OpenAIRow, "sharegpt": ShareGptRow, "prompt": PromptRow,
                                           "preference": PreferenceRow}
"""Each ingest format (``policies.ingest.FORMAT_KEYS``) and the model that documents its rows."""
Row = Annotated[OpenAIRow | ShareGptRow | PromptRow | PreferenceRow, Field(
    description="One interaction in any of the ingest formats, plus optional id, domain, tags, feedback.")]


COMPONENTS = "#/components/schemas/{model}"


def _components(named: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """JSON Schemas of the named types and of the models inside them, as OpenAPI components."""
    out: dict[str, dict[str, Any]] = {}
    for name, annotation in named.items():
        schema = TypeAdapter(annotation).json_schema(ref_template=COMPONENTS)
        out.update(schema.pop("$defs", {}))
        out[name] = schema
    return out


def _ref(name: str) -> dict[str, str]:
    return {"$ref": COMPONENTS.format(model=name)}


def request_body(schema: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON body that the route reads itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


BODY_COMPONENTS = _components({"IngestRow": Row, "Feedback": Feedback})
"""Schemas the two bodies below refer to; ``create_app`` adds them to the OpenAPI document's components."""
INGEST_BODY = request_body({"oneOf": [_ref("IngestRow"), {"type": "array", "items": _ref("IngestRow"), "minItems": 1}]})
FEEDBACK_BODY = request_body(_ref("Feedback"))


# -- responses and parsed requests -------------------------------------------------------------------------


class IngestResponse(BaseModel):
    accepted: int
    duplicates: int
    rejected: int = 0
    id: int | None = Field(None, description="For a single row: the interaction's id (also when it was a duplicate "
                                             "with an external id); null for batches.")


def _check_texts(value: Any) -> Any:
    """``check_text`` on a text, or on each text (or text part) of a list. It runs after the union is
    validated, so that an error names the field (``messages[0].content``), not each union member."""
    for item in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        text = item.text if isinstance(item, ContentPart) else item
        if isinstance(text, str):
            check_text(text)
    return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(description=f"One of {', '.join(ROLES)} (\"developer\" is read as \"system\").")
    """A plain string: the ingest checks answer a role they do not know, naming ``messages``."""
    content: Annotated[str | list[ContentPart] | None, AfterValidator(_check_texts)] = None
    name: Text | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request. A parameter selftune does not implement (``tools``, ``response_format``,
    ``logit_bias``, ...: ``routers.chat.UNSUPPORTED``) is refused by name unless it asks for nothing; other
    unknown fields are ignored."""

    model_config = ConfigDict(extra="allow")
    model: Text = Field(max_length=200, description="Who answers (GET /v1/models lists the names): a branch (its "
                                                   "champion), `branch@champion`, `branch@challenger`, "
                                                   "`branch@<generation id>`, or `auto` (the router chooses).")
    messages: list[ChatMessage] = Field(min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str | list[str] | None, AfterValidator(_check_texts)] = None
    seed: Int64 | None = None
    logprobs: bool = Field(False, description="Return each answer token's log-probability under the model.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With `logprobs`: the most likely tokens at "
                                                                    "each position, this many.")
    user: Text | None = Field(None, max_length=256)
    domain: Text | None = Field(None, description="selftune: the domain the logged interaction is filed under.")
    tags: list[Text] | None = Field(None, description="selftune: tags of the logged interaction.")


class CycleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    branch: str | None = Field(None, description="Branch to run a cycle on [default: ingest.default_branch].")
