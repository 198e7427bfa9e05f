"""Request and response schemas of the OpenAI-compatible API and the Open Inference Protocol.

OpenAI request schemas are strict, as OpenAI's API is: an unknown parameter is a 400 naming it
(`unknown_parameter`), never silently dropped, and every field has its JSON type exactly (no
"16" for 16, no "yes" for true, integers bounded), because a client whose parameter is ignored
or coerced gets an answer to a request it did not make. Parameters some backends can't serve
are accepted here and refused per model in the service (`unsupported_parameter`).
"""

from __future__ import annotations

import re
from typing import Any

import marshmallow as ma
from marshmallow import validate

from app.errors import UNKNOWN_PARAMETER, APIError
from app.fields import StrictBoolean, StrictInteger, StrictNumber

# Above any context window; the model's own limit is then checked in the service with a clear 400.
MAX_TOKENS_BOUND = 1_048_576
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class StringOrStrings(ma.fields.Field):
    """`"text"` or `["a", "b"]`, as OpenAI's `input` and `stop` accept."""

    def __init__(self, *, max_items: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_items = max_items

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[str]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ma.ValidationError("Must be a string or a list of strings.")
        if self.max_items is not None and len(items) > self.max_items:
            raise ma.ValidationError(f"At most {self.max_items} items.")
        return items

    def _jsonschema_type_mapping(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}


class MessageContent(ma.fields.Field):
    """A message's content: a string, or a list of `{"type": "text", "text": ...}` parts."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
        ):
            return "".join(p["text"] for p in value)
        raise ma.ValidationError(
            "Must be a string or a list of text parts; other part types are not supported."
        )


class Base(ma.Schema):
    class Meta:
        unknown = ma.EXCLUDE


class Strict(ma.Schema):
    """OpenAI request objects: an unknown key is an error naming it, as OpenAI answers."""

    class Meta:
        unknown = ma.RAISE

    error_messages = {"unknown": UNKNOWN_PARAMETER}


class FunctionSchema(Strict):
    name = ma.fields.String(required=True, validate=validate.Regexp(FUNCTION_NAME))
    description = ma.fields.String()
    parameters = ma.fields.Dict(metadata={"description": "JSON Schema of the arguments."})
    strict = StrictBoolean(allow_none=True)


class ToolSchema(Strict):
    type = ma.fields.String(required=True, validate=validate.OneOf(["function"]))
    function = ma.fields.Nested(FunctionSchema, required=True)


class CalledFunctionSchema(Strict):
    name = ma.fields.String(required=True)
    arguments = ma.fields.String(required=True, metadata={"description": "JSON text, as the model wrote it."})


class ToolCallSchema(Strict):
    id = ma.fields.String(required=True)
    type = ma.fields.String(required=True, validate=validate.OneOf(["function"]))
    function = ma.fields.Nested(CalledFunctionSchema, required=True)


class NamedFunctionSchema(Strict):
    name = ma.fields.String(required=True)


class NamedToolChoiceSchema(Strict):
    type = ma.fields.String(required=True, validate=validate.OneOf(["function"]))
    function = ma.fields.Nested(NamedFunctionSchema, required=True)


class ToolChoice(ma.fields.Field):
    """`"none" | "auto" | "required"`, or `{"type": "function", "function": {"name": ...}}`."""

    MODES = ("none", "auto", "required")

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            if value not in self.MODES:
                raise ma.ValidationError(f"Must be one of {', '.join(self.MODES)}, or a named function.")
            return value
        if isinstance(value, dict):
            return NamedToolChoiceSchema().load(value)
        raise ma.ValidationError("Must be a string or an object.")

    def _jsonschema_type_mapping(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "string", "enum": list(self.MODES)}, {"type": "object"}]}


class JsonSchemaFormatSchema(Strict):
    name = ma.fields.String(required=True, validate=validate.Regexp(FUNCTION_NAME))
    description = ma.fields.String()
    schema = ma.fields.Dict(metadata={"description": "The JSON Schema the output must match."})
    strict = StrictBoolean(allow_none=True)


class ResponseFormatSchema(Strict):
    type = ma.fields.String(required=True, validate=validate.OneOf(["text", "json_object", "json_schema"]))
    json_schema = ma.fields.Nested(JsonSchemaFormatSchema)

    @ma.validates_schema
    def _schema_with_its_type(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data["type"] == "json_schema" and "json_schema" not in data:
            raise ma.ValidationError("Required when type is json_schema.", "json_schema")
        if data["type"] != "json_schema" and "json_schema" in data:
            raise ma.ValidationError("Only allowed when type is json_schema.", "json_schema")


class MessageSchema(Strict):
    """One message of any role; `_fields_of_its_role` holds each role to OpenAI's rules."""

    role = ma.fields.String(
        required=True, validate=validate.OneOf(["system", "developer", "user", "assistant", "tool"])
    )
    # Checked per role below: an assistant message that only calls tools may omit it or send null.
    content = MessageContent(allow_none=True, metadata={"description": "Text, or a list of text parts."})
    name = ma.fields.String()
    tool_calls = ma.fields.List(ma.fields.Nested(ToolCallSchema), validate=validate.Length(min=1))
    tool_call_id = ma.fields.String()
    refusal = ma.fields.String(allow_none=True)

    @ma.validates_schema
    def _fields_of_its_role(self, data: dict[str, Any], **kwargs: Any) -> None:
        role = data["role"]
        if data.get("content") is None and not (role == "assistant" and data.get("tool_calls")):
            raise ma.ValidationError("Required, unless an assistant message has tool_calls.", "content")
        if role == "tool" and not data.get("tool_call_id"):
            raise ma.ValidationError("Required on a tool message.", "tool_call_id")
        if role != "tool" and "tool_call_id" in data:
            raise ma.ValidationError("Only allowed on a tool message.", "tool_call_id")
        for key in ("tool_calls", "refusal"):
            if role != "assistant" and key in data:
                raise ma.ValidationError("Only allowed on an assistant message.", key)


class StreamOptionsSchema(Strict):
    include_usage = StrictBoolean(load_default=False)


class ChatCompletionRequestSchema(Strict):
    model = ma.fields.String(required=True, metadata={"example": "smollm2"})
    messages = ma.fields.List(
        ma.fields.Nested(MessageSchema),
        required=True,
        validate=validate.Length(min=1, error="At least one message is required."),
        metadata={"example": [{"role": "user", "content": "Say hello in French."}]},
    )
    max_tokens = StrictInteger(allow_none=True, minimum=1, maximum=MAX_TOKENS_BOUND)
    max_completion_tokens = StrictInteger(allow_none=True, minimum=1, maximum=MAX_TOKENS_BOUND)
    temperature = StrictNumber(allow_none=True, validate=validate.Range(min=0, max=2))
    top_p = StrictNumber(allow_none=True, validate=validate.Range(min=0, max=1))
    presence_penalty = StrictNumber(allow_none=True, validate=validate.Range(min=-2, max=2))
    frequency_penalty = StrictNumber(allow_none=True, validate=validate.Range(min=-2, max=2))
    stop = StringOrStrings(allow_none=True, max_items=4)
    seed = StrictInteger(allow_none=True)
    user = ma.fields.String(allow_none=True, validate=validate.Length(max=256))
    n = StrictInteger(allow_none=True, load_default=1, minimum=1, maximum=128)
    stream = StrictBoolean(allow_none=True, load_default=False)
    stream_options = ma.fields.Nested(StreamOptionsSchema, allow_none=True)
    response_format = ma.fields.Nested(ResponseFormatSchema, allow_none=True)
    tools = ma.fields.List(
        ma.fields.Nested(ToolSchema), allow_none=True, validate=validate.Length(min=1, max=128)
    )
    tool_choice = ToolChoice(allow_none=True)
    parallel_tool_calls = StrictBoolean(allow_none=True)
    logprobs = StrictBoolean(allow_none=True)
    top_logprobs = StrictInteger(allow_none=True, minimum=0, maximum=20)

    @ma.validates_schema
    def _dependent_parameters(self, data: dict[str, Any], **kwargs: Any) -> None:
        """The pairs OpenAI checks together, with its answers."""
        if data.get("stream_options") is not None and not data.get("stream"):
            raise ma.ValidationError("Only allowed when stream is true.", "stream_options")
        if data.get("tool_choice") is not None and not data.get("tools"):
            raise ma.ValidationError("Only allowed when tools are specified.", "tool_choice")
        choice = data.get("tool_choice")
        if isinstance(choice, dict):
            names = {tool["function"]["name"] for tool in data["tools"]}
            if choice["function"]["name"] not in names:
                raise ma.ValidationError("Names a function that is not in tools.", "tool_choice")
        if data.get("top_logprobs") is not None and not data.get("logprobs"):
            raise ma.ValidationError("Only allowed when logprobs is true.", "top_logprobs")


class ToolCallOutSchema(ma.Schema):
    id = ma.fields.String()
    type = ma.fields.String(metadata={"example": "function"})
    function = ma.fields.Dict(metadata={"description": "`{name, arguments}`, arguments as JSON text."})


class ChatMessageOutSchema(ma.Schema):
    role = ma.fields.String()
    content = ma.fields.String(allow_none=True, metadata={"description": "null when the model called tools"})
    tool_calls = ma.fields.List(ma.fields.Nested(ToolCallOutSchema))


class ChoiceSchema(ma.Schema):
    index = ma.fields.Integer()
    message = ma.fields.Nested(ChatMessageOutSchema)
    logprobs = ma.fields.Dict(allow_none=True, metadata={"description": "With `logprobs: true`."})
    finish_reason = ma.fields.String(metadata={"description": "stop, length, tool_calls or content_filter"})


class UsageSchema(ma.Schema):
    prompt_tokens = ma.fields.Integer()
    completion_tokens = ma.fields.Integer()
    total_tokens = ma.fields.Integer()


class ChatCompletionSchema(ma.Schema):
    id = ma.fields.String()
    object = ma.fields.String(metadata={"example": "chat.completion"})
    created = ma.fields.Integer()
    model = ma.fields.String()
    choices = ma.fields.List(ma.fields.Nested(ChoiceSchema))
    usage = ma.fields.Nested(UsageSchema)


class DeltaSchema(ma.Schema):
    role = ma.fields.String()
    content = ma.fields.String(allow_none=True)
    tool_calls = ma.fields.List(
        ma.fields.Dict(),
        metadata={"description": "Pieces of tool calls, by `index`, as OpenAI streams them."},
    )


class ChunkChoiceSchema(ma.Schema):
    index = ma.fields.Integer()
    delta = ma.fields.Nested(DeltaSchema)
    logprobs = ma.fields.Dict(allow_none=True)
    finish_reason = ma.fields.String(allow_none=True)


class ChatCompletionChunkSchema(ma.Schema):
    """One `data:` event of a stream (documentation only: streams are written, not dumped)."""

    id = ma.fields.String()
    object = ma.fields.String(metadata={"example": "chat.completion.chunk"})
    created = ma.fields.Integer()
    model = ma.fields.String()
    choices = ma.fields.List(ma.fields.Nested(ChunkChoiceSchema))
    usage = ma.fields.Nested(UsageSchema, allow_none=True)


class EmbeddingRequestSchema(Strict):
    model = ma.fields.String(required=True, metadata={"example": "all-minilm-l6-v2"})
    input = StringOrStrings(required=True, metadata={"example": ["first text", "second text"]})
    encoding_format = ma.fields.String(load_default="float", validate=validate.OneOf(["float", "base64"]))
    dimensions = StrictInteger(allow_none=True, minimum=1, maximum=65_536)
    user = ma.fields.String(allow_none=True)


class EmbeddingSchema(ma.Schema):
    object = ma.fields.String(metadata={"example": "embedding"})
    index = ma.fields.Integer()
    embedding = ma.fields.Raw(metadata={"description": "float list, or base64 of little-endian float32"})


class EmbeddingUsageSchema(ma.Schema):
    prompt_tokens = ma.fields.Integer()
    total_tokens = ma.fields.Integer()


class EmbeddingListSchema(ma.Schema):
    object = ma.fields.String(metadata={"example": "list"})
    data = ma.fields.List(ma.fields.Nested(EmbeddingSchema))
    model = ma.fields.String()
    usage = ma.fields.Nested(EmbeddingUsageSchema)


class ModelSchema(ma.Schema):
    id = ma.fields.String()
    object = ma.fields.String(metadata={"example": "model"})
    created = ma.fields.Integer()
    owned_by = ma.fields.String()
    version = ma.fields.String()
    backend = ma.fields.String()
    capabilities = ma.fields.List(ma.fields.String())
    state = ma.fields.String(metadata={"description": "loading, loaded or failed"})


class ModelListSchema(ma.Schema):
    object = ma.fields.String(metadata={"example": "list"})
    data = ma.fields.List(ma.fields.Nested(ModelSchema))


# Open Inference Protocol (KServe V2) ---------------------------------------------------------
DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]


class TensorSchema(Base):
    name = ma.fields.String(required=True)
    shape = ma.fields.List(ma.fields.Integer(validate=validate.Range(min=0)), required=True)
    datatype = ma.fields.String(required=True, validate=validate.OneOf(DATATYPES))
    data = ma.fields.List(
        # Never null, at any depth: the document says which values a tensor holds.
        ma.fields.Raw(metadata={"oneOf": [{"type": t} for t in ("number", "string", "boolean", "array")]}),
        required=True,
        metadata={"description": "Flattened row-major, or nested lists."},
    )
    parameters = ma.fields.Dict()


class RequestOutputSchema(Base):
    name = ma.fields.String(required=True)
    parameters = ma.fields.Dict()


class InferenceRequestSchema(Base):
    id = ma.fields.String()
    parameters = ma.fields.Dict(load_default=dict)
    inputs = ma.fields.List(ma.fields.Nested(TensorSchema), required=True, validate=validate.Length(min=1))
    outputs = ma.fields.List(ma.fields.Nested(RequestOutputSchema))


class InferenceResponseSchema(ma.Schema):
    model_name = ma.fields.String()
    model_version = ma.fields.String()
    id = ma.fields.String()
    parameters = ma.fields.Dict()
    outputs = ma.fields.List(ma.fields.Nested(TensorSchema))


class TensorMetadataSchema(ma.Schema):
    name = ma.fields.String()
    datatype = ma.fields.String()
    shape = ma.fields.List(ma.fields.Integer())


class ModelMetadataSchema(ma.Schema):
    name = ma.fields.String()
    versions = ma.fields.List(ma.fields.String())
    platform = ma.fields.String()
    inputs = ma.fields.List(ma.fields.Nested(TensorMetadataSchema))
    outputs = ma.fields.List(ma.fields.Nested(TensorMetadataSchema))


# Fan-out -------------------------------------------------------------------------------------
class FanoutCallSchema(Base):
    model = ma.fields.String(required=True)
    operation = ma.fields.String(
        load_default="chat", validate=validate.OneOf(["chat", "embeddings", "infer"])
    )
    input = ma.fields.Dict(
        required=True, metadata={"description": "The body the operation's own endpoint takes."}
    )
    deadline_ms = ma.fields.Integer(validate=validate.Range(min=1, max=600_000))


class FanoutRequestSchema(Base):
    mode = ma.fields.String(load_default="all", validate=validate.OneOf(["all", "first"]))
    deadline_ms = ma.fields.Integer(load_default=60_000, validate=validate.Range(min=1, max=600_000))
    calls = ma.fields.List(
        ma.fields.Nested(FanoutCallSchema), required=True, validate=validate.Length(min=1, max=32)
    )


class FanoutResultSchema(ma.Schema):
    index = ma.fields.Integer()
    model = ma.fields.String()
    status = ma.fields.String(metadata={"description": "ok, error, deadline_exceeded or cancelled"})
    latency_ms = ma.fields.Float()
    result = ma.fields.Dict(allow_none=True)
    error = ma.fields.Dict(allow_none=True)


class FanoutResponseSchema(ma.Schema):
    object = ma.fields.String(metadata={"example": "fanout.result"})
    mode = ma.fields.String()
    latency_ms = ma.fields.Float()
    results = ma.fields.List(ma.fields.Nested(FanoutResultSchema))


def reject(param: str, message: str, code: str = "invalid_value", status: int = 400) -> APIError:
    return APIError(status, message, code=code, param=param)
