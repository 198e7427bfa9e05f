"""Route: retrieval-augmented chat over one collection (on the inference blueprint)."""

from __future__ import annotations

from typing import Any

from flask import Response

from app.admission import unbounded
from app.identity import scopes as sc
from app.identity.principal import current_principal, require_scopes
from app.inference import blp
from app.inference.rag import service
from app.inference.rag.schemas import RagChatCompletionSchema, RagChatRequestSchema, RagChunkSchema

SSE_DESCRIPTION = (
    "With `stream: true`: server-sent events framed as chat streams are (`data: <json>`, then "
    "`data: [DONE]`). The first event is `rag.citations` (the chunks given to the model), then "
    "`chat.completion.chunk` events, then, just before `[DONE]`, `rag.timings` with the timings "
    "and the source numbers the answer cited. `: ping` comments keep the connection alive."
)


@blp.route("/v1/rag/chat", methods=["POST"])
@require_scopes(sc.INFERENCE_INVOKE)
@blp.arguments(RagChatRequestSchema)
@blp.response(200, RagChatCompletionSchema)
@blp.alt_response(
    200, schema=RagChunkSchema, content_type="text/event-stream", description=SSE_DESCRIPTION, success=True
)
@blp.doc(responses={400: "BAD_REQUEST", 404: "NOT_FOUND", 409: "CONFLICT"})
@unbounded
def rag_chat(body: dict[str, Any]) -> dict[str, Any] | Response:
    """Chat with a collection's documents

    The last user message is embedded with the collection's model and its `top_k` nearest chunks
    (after `filter`) become numbered sources in a system message; the chat model answers through
    the same path as /v1/chat/completions (policy, quota, audit, rate limit, metrics). The reply
    is a chat completion plus `citations` (chunk and document ids, score, text) and `timings`.
    """
    return service.rag_chat(current_principal(), body)
