"""Request and response schemas of collections, documents, search and RAG chat.

Requests are strict, as the OpenAI-style routes are: an unknown key is refused by name.
The limits below are documented in the OpenAPI description of each field and in the README.
"""

from __future__ import annotations

import re
from typing import Any

import marshmallow as ma
from marshmallow import validate

from app.fields import StrictBoolean, StrictInteger, StrictNumber
from app.governance.pagination import PageArgsSchema, PageSchema
from app.inference.rag.filters import COMPARISONS, KEY, MAX_CONDITIONS, MAX_IN_VALUES, is_scalar
from app.inference.schemas import (
    MAX_TOKENS_BOUND,
    ChatCompletionSchema,
    EmbeddingUsageSchema,
    MessageSchema,
    StreamOptionsSchema,
    Strict,
    StringOrStrings,
    UsageSchema,
)

MAX_DOCUMENTS_PER_CALL = 32
MAX_DOCUMENT_CHARS = 50_000  # a larger document is 413 document_too_large: split it before sending
MAX_METADATA_KEYS = 32
MAX_METADATA_STRING = 1_000
MAX_QUERY_CHARS = 4_000
MAX_TOP_K = 50
MAX_CHAT_TOP_K = 20

FILTER_DESCRIPTION = (
    "Metadata conditions, all of which must hold: `{key: scalar}` is equality, or "
    "`{key: {op: value}}` with op one of `$eq`, `$ne`, `$in` (list of scalars), `$gt`, `$gte`, "
    "`$lt`, `$lte` (numbers). At most 16 conditions."
)


def _check_metadata(value: dict[str, Any]) -> None:
    if len(value) > MAX_METADATA_KEYS:
        raise ma.ValidationError(f"At most {MAX_METADATA_KEYS} keys.")
    for key, item in value.items():
        if not KEY.match(key):
            raise ma.ValidationError(f"Key {key!r}: 1-64 characters of letters, digits and _ . : -")
        if item is not None and not is_scalar(item):
            raise ma.ValidationError(f"Key {key!r}: values are strings, numbers, booleans or null.")
        if isinstance(item, str) and len(item) > MAX_METADATA_STRING:
            raise ma.ValidationError(f"Key {key!r}: strings are at most {MAX_METADATA_STRING} characters.")


# JSON Schema's (ECMAScript's) `\s`, so the documented `pattern: \S` and this check agree exactly.
_BLANK = re.compile(r"^[\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]*$")


def _has_text(value: str) -> None:
    if _BLANK.match(value):
        raise ma.ValidationError("Must contain text, not only whitespace.")


SCALAR_SCHEMA: dict[str, Any] = {"type": ["string", "number", "boolean"]}
KEY_SCHEMA = {"pattern": KEY.pattern}


class MetadataField(ma.fields.Dict):
    """A document's flat metadata, documented as exactly as `_check_metadata` checks it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(keys=ma.fields.String(), validate=_check_metadata, **kwargs)

    def _jsonschema_type_mapping(self) -> dict[str, Any]:
        value = {"type": ["string", "number", "boolean", "null"], "maxLength": MAX_METADATA_STRING}
        return {
            "type": "object",
            "maxProperties": MAX_METADATA_KEYS,
            "propertyNames": KEY_SCHEMA,
            "additionalProperties": value,
        }


class FilterField(ma.fields.Dict):
    """A search filter: checked by `filters.parse` (400 invalid_filter, naming the key), and
    documented here with the same grammar, so a client generating from the spec sends valid ones."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(allow_none=True, metadata={"description": FILTER_DESCRIPTION}, **kwargs)

    def _jsonschema_type_mapping(self) -> dict[str, Any]:
        def operator(name: str, schema: dict[str, Any]) -> dict[str, Any]:
            return {
                "type": "object",
                "properties": {name: schema},
                "required": [name],
                "additionalProperties": False,
            }

        number = {"type": "number"}
        scalars = {"type": "array", "items": SCALAR_SCHEMA, "minItems": 1, "maxItems": MAX_IN_VALUES}
        condition = {
            "oneOf": [
                SCALAR_SCHEMA,
                operator("$eq", SCALAR_SCHEMA),
                operator("$ne", SCALAR_SCHEMA),
                operator("$in", scalars),
                *(operator(op, number) for op in COMPARISONS),
            ]
        }
        return {
            "type": ["object", "null"],
            "maxProperties": MAX_CONDITIONS,
            "propertyNames": KEY_SCHEMA,
            "additionalProperties": condition,
            "description": FILTER_DESCRIPTION,
        }


# collections ----------------------------------------------------------------------------------
class CollectionCreateSchema(Strict):
    name = ma.fields.String(required=True, validate=validate.Length(min=1, max=128))
    description = ma.fields.String(load_default="", validate=validate.Length(max=2_000))
    embedding_model = ma.fields.String(
        validate=validate.Length(min=1, max=128),
        metadata={
            "description": "A model with the embeddings capability (local or upstream). Default: "
            "RAG_EMBEDDING_MODEL (all-minilm-l6-v2). Pinned for the collection's life."
        },
    )


class CollectionSchema(ma.Schema):
    id = ma.fields.String()
    object = ma.fields.Constant("rag.collection")
    tenant_id = ma.fields.String()
    name = ma.fields.String()
    description = ma.fields.String()
    embedding_model = ma.fields.String()
    dimensions = ma.fields.Integer(
        allow_none=True, metadata={"description": "null until the first document when the model can't tell"}
    )
    document_count = ma.fields.Integer()
    chunk_count = ma.fields.Integer()
    created_at = ma.fields.DateTime()


class CollectionPageSchema(PageSchema):
    data = ma.fields.List(ma.fields.Nested(CollectionSchema))


class CollectionListArgsSchema(PageArgsSchema):
    tenant_id = ma.fields.String(metadata={"description": "Platform admin only: another tenant's."})


class DeletedSchema(ma.Schema):
    id = ma.fields.String()
    object = ma.fields.Constant("rag.collection")
    deleted = ma.fields.Boolean()


# documents ------------------------------------------------------------------------------------
class DocumentInSchema(Strict):
    text = ma.fields.String(
        required=True,
        validate=_has_text,
        metadata={
            "description": f"At most {MAX_DOCUMENT_CHARS} characters (413 document_too_large).",
            "maxLength": MAX_DOCUMENT_CHARS,
            "pattern": r"\S",
        },
    )
    metadata = MetadataField(
        load_default=dict,
        metadata={"description": "Flat: string, number, boolean or null values; searchable with `filter`."},
    )


class IngestRequestSchema(Strict):
    documents = ma.fields.List(
        ma.fields.Nested(DocumentInSchema),
        required=True,
        validate=validate.Length(min=1, max=MAX_DOCUMENTS_PER_CALL),
    )


class DocumentSchema(ma.Schema):
    id = ma.fields.String()
    object = ma.fields.Constant("rag.document")
    collection_id = ma.fields.String()
    metadata = ma.fields.Dict(attribute="meta")
    chars = ma.fields.Integer()
    chunk_count = ma.fields.Integer()
    chunk_ids = ma.fields.List(ma.fields.String())
    created_at = ma.fields.DateTime()


class IngestTimingsSchema(ma.Schema):
    chunk_ms = ma.fields.Float()
    embed_ms = ma.fields.Float()
    store_ms = ma.fields.Float()


class IngestResponseSchema(ma.Schema):
    object = ma.fields.Constant("list")
    collection_id = ma.fields.String()
    data = ma.fields.List(ma.fields.Nested(DocumentSchema))
    usage = ma.fields.Nested(EmbeddingUsageSchema)
    timings = ma.fields.Nested(IngestTimingsSchema)


# search ---------------------------------------------------------------------------------------
class SearchRequestSchema(Strict):
    query = ma.fields.String(
        required=True,
        validate=[validate.Length(min=1, max=MAX_QUERY_CHARS), _has_text],
        metadata={"pattern": r"\S"},
    )
    top_k = StrictInteger(load_default=5, minimum=1, maximum=MAX_TOP_K)
    filter = FilterField()


class HitSchema(ma.Schema):
    chunk_id = ma.fields.String()
    document_id = ma.fields.String()
    ordinal = ma.fields.Integer(metadata={"description": "The chunk's position in its document."})
    score = ma.fields.Float(metadata={"description": "Cosine similarity, -1 to 1."})
    text = ma.fields.String()
    metadata = ma.fields.Dict()
    start_char = ma.fields.Integer()
    end_char = ma.fields.Integer()


class RetrievalTimingsSchema(ma.Schema):
    embed_ms = ma.fields.Float()
    retrieval_ms = ma.fields.Float()


class SearchResponseSchema(ma.Schema):
    object = ma.fields.Constant("list")
    collection_id = ma.fields.String()
    store = ma.fields.String(metadata={"description": "pgvector or exact"})
    data = ma.fields.List(ma.fields.Nested(HitSchema))
    usage = ma.fields.Nested(EmbeddingUsageSchema)
    timings = ma.fields.Nested(RetrievalTimingsSchema)


# RAG chat -------------------------------------------------------------------------------------
class RagChatRequestSchema(Strict):
    collection_id = ma.fields.String(required=True)
    model = ma.fields.String(required=True, metadata={"example": "smollm2"})
    messages = ma.fields.List(
        ma.fields.Nested(MessageSchema),
        required=True,
        validate=validate.Length(min=1, error="At least one message is required."),
        metadata={"description": "The conversation; its last user message is the retrieval query."},
    )
    top_k = StrictInteger(load_default=4, minimum=1, maximum=MAX_CHAT_TOP_K)
    filter = FilterField()
    max_tokens = StrictInteger(allow_none=True, minimum=1, maximum=MAX_TOKENS_BOUND)
    temperature = StrictNumber(allow_none=True, validate=validate.Range(min=0, max=2))
    top_p = StrictNumber(allow_none=True, validate=validate.Range(min=0, max=1))
    stop = StringOrStrings(allow_none=True, max_items=4)
    seed = StrictInteger(allow_none=True)
    user = ma.fields.String(allow_none=True, validate=validate.Length(max=256))
    stream = StrictBoolean(allow_none=True, load_default=False)
    stream_options = ma.fields.Nested(StreamOptionsSchema, allow_none=True)

    @ma.validates_schema
    def _a_question(self, data: dict[str, Any], **kwargs: Any) -> None:
        if not any(m["role"] == "user" and (m.get("content") or "").strip() for m in data["messages"]):
            raise ma.ValidationError("A user message with text is required: it is the query.", "messages")
        if data.get("stream_options") is not None and not data.get("stream"):
            raise ma.ValidationError("Only allowed when stream is true.", "stream_options")


class CitationSchema(HitSchema):
    index = ma.fields.Integer(metadata={"description": "The [n] the answer cites this chunk by."})
    cited = ma.fields.Boolean(metadata={"description": "Whether the answer cites [n]."})


class RagTimingsSchema(RetrievalTimingsSchema):
    generation_ms = ma.fields.Float()
    total_ms = ma.fields.Float()


class RagUsageSchema(UsageSchema):
    embedding_tokens = ma.fields.Integer(metadata={"description": "Tokens of the question's embedding."})


class RagChatCompletionSchema(ChatCompletionSchema):
    collection_id = ma.fields.String()
    citations = ma.fields.List(ma.fields.Nested(CitationSchema))
    timings = ma.fields.Nested(RagTimingsSchema)
    usage = ma.fields.Nested(RagUsageSchema)


class RagChunkSchema(ma.Schema):
    """Documentation of the stream's extra events (streams are written, not dumped)."""

    object = ma.fields.String(metadata={"description": "rag.citations (first event) or rag.timings (last)"})
    citations = ma.fields.List(ma.fields.Nested(CitationSchema))
    timings = ma.fields.Nested(RagTimingsSchema)
