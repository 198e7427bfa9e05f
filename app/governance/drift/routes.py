"""`GET /v1/governance/models/<name>/drift`: the drift report of every served version of a model.

Models are platform-wide but their traffic is not: a tenant's report covers its own inputs only,
since even distribution statistics (a sample size, PSI, a centroid) over another tenant's inputs
tell something about that tenant's traffic. The platform admin sees every tenant's inputs
together, or names a tenant. A report never shows an input.
"""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from app.governance import blp
from app.governance.drift.monitor import monitor
from app.identity.principal import require_scopes
from app.identity.scopes import GOVERNANCE_READ
from app.identity.scoping import tenant_scope


class DriftArgsSchema(ma.Schema):
    tenant_id = ma.fields.String(
        metadata={"description": "Platform admin: this tenant's inputs only (default: every tenant's)."}
    )


class FeatureDriftSchema(ma.Schema):
    name = ma.fields.String(metadata={"description": "Input feature; `length` for text models."})
    psi = ma.fields.Float(metadata={"description": "Population stability index against the reference."})
    p_value = ma.fields.Float(metadata={"description": "Of the test named in `test`."})
    test = ma.fields.String(
        metadata={
            "description": "`chi2` (two-sample, on the reference's bins) or `ks` (two-sample, raw values)."
        }
    )
    drifted = ma.fields.Boolean(metadata={"description": "PSI over its threshold and p-value under its own."})


class EmbeddingDriftSchema(ma.Schema):
    status = ma.fields.String(metadata={"description": "ok, insufficient_data or reference_unavailable."})
    sample_size = ma.fields.Integer()
    centroid_distance = ma.fields.Float(
        allow_none=True,
        metadata={"description": "Cosine distance of live and reference embedding centroids."},
    )
    threshold = ma.fields.Float()
    drifted = ma.fields.Boolean()


class VersionDriftSchema(ma.Schema):
    version = ma.fields.String()
    kind = ma.fields.String(metadata={"description": "tabular or text."})
    status = ma.fields.String(metadata={"description": "ok, insufficient_data or no_reference."})
    sample_size = ma.fields.Integer(metadata={"description": "Live inputs in the window."})
    drifted = ma.fields.Boolean()
    drifted_features = ma.fields.List(ma.fields.String())
    features = ma.fields.List(
        ma.fields.Nested(FeatureDriftSchema), metadata={"description": "Empty below `min_samples`."}
    )
    embedding = ma.fields.Nested(
        EmbeddingDriftSchema, allow_none=True, metadata={"description": "Text models that embed; else null."}
    )


class DriftThresholdsSchema(ma.Schema):
    psi = ma.fields.Float()
    p_value = ma.fields.Float()
    centroid_distance = ma.fields.Float()


class DriftReportSchema(ma.Schema):
    model = ma.fields.String()
    tenant_id = ma.fields.String(
        allow_none=True, metadata={"description": "Whose inputs were judged; null: every tenant's."}
    )
    drifted = ma.fields.Boolean(metadata={"description": "True if any served version drifted."})
    computed_at = ma.fields.DateTime()
    window = ma.fields.Integer(metadata={"description": "Most recent inputs compared, per version."})
    min_samples = ma.fields.Integer(metadata={"description": "Inputs needed before a version is judged."})
    thresholds = ma.fields.Nested(DriftThresholdsSchema)
    versions = ma.fields.List(ma.fields.Nested(VersionDriftSchema))


@blp.route("/v1/governance/models/<name>/drift", methods=["GET"])
@require_scopes(GOVERNANCE_READ)
@blp.arguments(DriftArgsSchema, location="query")
@blp.response(200, DriftReportSchema)
def model_drift(args: dict[str, Any], name: str) -> dict[str, Any]:
    """Drift of a model's live inputs against its reference profile

    Computed on request from the rolling window of recent inputs, per served version. A tenant
    sees the drift of its own inputs only; a platform admin sees every tenant's together, or one
    tenant's with `tenant_id`. The `gateway_model_drift_*` gauges show the all-tenants figures.
    """
    return monitor().report(name, tenant_scope(args.get("tenant_id")))
