"""Inference blueprint: the OpenAI-compatible API and the Open Inference Protocol (v2)."""

from flask import Response, g

from app.api import GatewayBlueprint

blp = GatewayBlueprint(
    "inference",
    __name__,
    description="OpenAI-compatible and Open Inference Protocol (v2) model serving, and RAG over collections.",
)


@blp.after_request
def served_version(response: Response) -> Response:
    """Which model version answered: canary rollouts are only auditable if clients can see it too."""
    if served := g.get("served_model"):
        response.headers["X-Model-Version"] = served
    return response


from app.inference import batches, fanout, openai_api, v2  # noqa: E402, F401  (register the routes)
from app.inference.rag import chat, collections  # noqa: E402, F401
