"""OpenAI-compatible routes: models, chat completions (JSON and SSE), embeddings.

An invalid request is a 400 `invalid_request_error` naming the field, as OpenAI answers, not
webargs' 422: the `openai` SDK maps the status to its exception class (`BadRequestError`), and
clients written against OpenAI catch that one.
"""

from __future__ import annotations

from typing import Any

from flask import Response

from app.admission import unbounded
from app.identity.principal import current_principal, require_scopes
from app.inference import blp, service
from app.inference.catalogue import catalogue
from app.inference.runtime import ModelRuntime
from app.inference.schemas import (
    ChatCompletionChunkSchema,
    ChatCompletionRequestSchema,
    ChatCompletionSchema,
    EmbeddingListSchema,
    EmbeddingRequestSchema,
    ModelListSchema,
    ModelSchema,
)

OPENAI_INVALID = 400
SSE_DESCRIPTION = (
    "With `stream: true`: server-sent events, each `data: <chat.completion.chunk>`, then `data: [DONE]`. "
    "With `stream_options.include_usage`, a last chunk with empty `choices` carries the usage. "
    "`: ping` comments keep the connection alive while the model works."
)


def _model_card(runtime: ModelRuntime) -> dict[str, Any]:
    return {
        "id": runtime.name,
        "object": "model",
        "created": 0,
        "owned_by": "flask-ai-gateway",
        "version": runtime.spec.version,
        "backend": runtime.spec.backend,
        "capabilities": sorted(runtime.backend.capabilities),
        "state": runtime.state,
    }


@blp.route("/v1/models")
@require_scopes("models:read")
@blp.response(200, ModelListSchema)
def list_models() -> dict[str, Any]:
    """List the models this gateway serves."""
    return {"object": "list", "data": [_model_card(r) for r in catalogue().served()]}


@blp.route("/v1/models/<path:model_id>")
@require_scopes("models:read")
@blp.response(200, ModelSchema)
def get_model(model_id: str) -> dict[str, Any]:
    """One model, by name or alias."""
    return _model_card(catalogue().get(model_id))


@blp.route("/v1/chat/completions", methods=["POST"])
@require_scopes("inference:invoke")
@blp.arguments(ChatCompletionRequestSchema, error_status_code=OPENAI_INVALID)
@blp.response(200, ChatCompletionSchema)
@blp.alt_response(
    200,
    schema=ChatCompletionChunkSchema,
    content_type="text/event-stream",
    description=SSE_DESCRIPTION,
    success=True,
)
@unbounded
def chat_completions(body: dict[str, Any]) -> dict[str, Any] | Response:
    """Chat completion, as OpenAI's API: JSON, or server-sent events with `stream: true`."""
    return service.chat_completion(current_principal(), body)


@blp.route("/v1/embeddings", methods=["POST"])
@require_scopes("inference:invoke")
@blp.arguments(EmbeddingRequestSchema, error_status_code=OPENAI_INVALID)
@blp.response(200, EmbeddingListSchema)
@unbounded
def embeddings(body: dict[str, Any]) -> dict[str, Any]:
    """Embeddings for one string or a list, as float lists or base64 float32."""
    return service.run_embeddings(current_principal(), body)
