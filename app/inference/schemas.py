"""Request and response schemas of the OpenAI-compatible API and the Open Inference Protocol.

Unknown request fields are ignored, as OpenAI-compatible servers do, because SDKs send
optional parameters (penalties, logprobs) that a given backend may not implement.
"""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from marshmallow import validate

from app.errors import APIError


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


class MessageSchema(Base):
    role = ma.fields.String(
        required=True, validate=validate.OneOf(["system", "developer", "user", "assistant", "tool"])
    )
    content = MessageContent(required=True, metadata={"description": "Text, or a list of text parts."})
    name = ma.fields.String()


class StreamOptionsSchema(Base):
    include_usage = ma.fields.Boolean(load_default=False)


class ChatCompletionRequestSchema(Base):
    model = ma.fields.String(required=True, metadata={"example": "smollm2"})
    messages = ma.fields.List(
        ma.fields.Nested(MessageSchema),
        required=True,
        validate=validate.Length(min=1, error="At least one message is required."),
        metadata={"example": [{"role": "user", "content": "Say hello in French."}]},
    )
    max_tokens = ma.fields.Integer(allow_none=True, validate=validate.Range(min=1))
    max_completion_tokens = ma.fields.Integer(allow_none=True, validate=validate.Range(min=1))
    temperature = ma.fields.Float(allow_none=True, validate=validate.Range(min=0, max=2))
    top_p = ma.fields.Float(allow_none=True, validate=validate.Range(min=0, max=1))
    stop = StringOrStrings(allow_none=True, max_items=4)
    seed = ma.fields.Integer(allow_none=True)
    user = ma.fields.String(allow_none=True, validate=validate.Length(max=256))
    n = ma.fields.Integer(allow_none=True, load_default=1, validate=validate.Range(min=1))
    stream = ma.fields.Boolean(allow_none=True, load_default=False)
    stream_options = ma.fields.Nested(StreamOptionsSchema, allow_none=True)


class ChatMessageOutSchema(ma.Schema):
    role = ma.fields.String()
    content = ma.fields.String()


class ChoiceSchema(ma.Schema):
    index = ma.fields.Integer()
    message = ma.fields.Nested(ChatMessageOutSchema)
    finish_reason = ma.fields.String(metadata={"description": "stop, length or content_filter"})


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
    content = ma.fields.String()


class ChunkChoiceSchema(ma.Schema):
    index = ma.fields.Integer()
    delta = ma.fields.Nested(DeltaSchema)
    finish_reason = ma.fields.String(allow_none=True)


class ChatCompletionChunkSchema(ma.Schema):
    """One `data:` event of a stream (documentation only: streams are written, not dumped)."""

    id = ma.fields.String()
    object = ma.fields.String(metadata={"example": "chat.completion.chunk"})
    created = ma.fields.Integer()
    model = ma.fields.String()
    choices = ma.fields.List(ma.fields.Nested(ChunkChoiceSchema))
    usage = ma.fields.Nested(UsageSchema, allow_none=True)


class EmbeddingRequestSchema(Base):
    model = ma.fields.String(required=True, metadata={"example": "all-minilm-l6-v2"})
    input = StringOrStrings(required=True, metadata={"example": ["first text", "second text"]})
    encoding_format = ma.fields.String(load_default="float", validate=validate.OneOf(["float", "base64"]))
    dimensions = ma.fields.Integer(allow_none=True, validate=validate.Range(min=1))
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
