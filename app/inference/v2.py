"""Open Inference Protocol (KServe V2) routes for the classic models."""

from __future__ import annotations

from typing import Any

from app.admission import unbounded
from app.identity.principal import current_principal, require_scopes
from app.inference import blp, service
from app.inference.catalogue import catalogue
from app.inference.schemas import InferenceRequestSchema, InferenceResponseSchema, ModelMetadataSchema


@blp.route("/v2/health/live")
@blp.response(200, description="The server is live.")
@unbounded
def v2_live() -> dict[str, bool]:
    """Liveness, in the protocol's own path."""
    return {"live": True}


@blp.route("/v2/health/ready")
@blp.response(200, description="Every required model is loaded.")
@blp.alt_response(503, description="Some required model is not loaded yet, or failed.")
@unbounded
def v2_ready() -> tuple[dict[str, bool], int]:
    """Readiness of the models: the required ones, as /readyz judges them."""
    models = catalogue()
    ready = all(r.ready for r in models.served() if models.is_required(r.name))
    return {"ready": ready}, 200 if ready else 503


def _metadata(name: str, version: str | None) -> dict[str, Any]:
    runtime = service.resolve_version(name, version)
    return {
        "name": runtime.name,
        "versions": [runtime.spec.version],
        "platform": runtime.spec.backend,
        "inputs": [t.as_dict() for t in runtime.backend.inputs()],
        "outputs": [t.as_dict() for t in runtime.backend.outputs()],
    }


@blp.route("/v2/models/<name>")
@require_scopes("models:read")
@blp.response(200, ModelMetadataSchema)
def v2_model(name: str) -> dict[str, Any]:
    """Model metadata: inputs and outputs with name, datatype and shape (-1 is variable)."""
    return _metadata(name, None)


@blp.route("/v2/models/<name>/versions/<version>")
@require_scopes("models:read")
@blp.response(200, ModelMetadataSchema)
def v2_model_version(name: str, version: str) -> dict[str, Any]:
    """Metadata of one version."""
    return _metadata(name, version)


@blp.route("/v2/models/<name>/ready")
@require_scopes("models:read")
@blp.response(200, description="Loaded.")
@blp.alt_response(503, description="Loading or failed.")
def v2_model_ready(name: str) -> tuple[dict[str, Any], int]:
    """Readiness of one model."""
    runtime = service.resolve_version(name, None)
    return {"name": runtime.name, "ready": runtime.ready}, 200 if runtime.ready else 503


@blp.route("/v2/models/<name>/versions/<version>/ready")
@require_scopes("models:read")
@blp.response(200, description="Loaded.")
@blp.alt_response(503, description="Loading or failed.")
def v2_model_version_ready(name: str, version: str) -> tuple[dict[str, Any], int]:
    """Readiness of one version."""
    runtime = service.resolve_version(name, version)
    return {"name": runtime.name, "ready": runtime.ready}, 200 if runtime.ready else 503


@blp.route("/v2/models/<name>/infer", methods=["POST"])
@require_scopes("inference:invoke")
@blp.arguments(InferenceRequestSchema)
@blp.response(200, InferenceResponseSchema)
@unbounded
def v2_infer(body: dict[str, Any], name: str) -> dict[str, Any]:
    """Inference; tensors are checked against the model's metadata."""
    return service.run_infer(current_principal(), name, None, body)


@blp.route("/v2/models/<name>/versions/<version>/infer", methods=["POST"])
@require_scopes("inference:invoke")
@blp.arguments(InferenceRequestSchema)
@blp.response(200, InferenceResponseSchema)
@unbounded
def v2_infer_version(body: dict[str, Any], name: str, version: str) -> dict[str, Any]:
    """Inference on one version."""
    return service.run_infer(current_principal(), name, version, body)
