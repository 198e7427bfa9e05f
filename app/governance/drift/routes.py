"""`GET /v1/governance/models/<name>/drift`: the drift report of every served version of a model.

Models are platform-wide, so the report is too: it aggregates every tenant's inputs into
distribution statistics (PSI, p-values, a centroid distance) and never shows an input.
"""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from app.governance import blp
from app.governance.drift.monitor import monitor
from app.identity.principal import require_scopes
from app.identity.scopes import GOVERNANCE_READ


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
    drifted = ma.fields.Boolean(metadata={"description": "True if any served version drifted."})
    computed_at = ma.fields.DateTime()
    window = ma.fields.Integer(metadata={"description": "Most recent inputs compared, per version."})
    min_samples = ma.fields.Integer(metadata={"description": "Inputs needed before a version is judged."})
    thresholds = ma.fields.Nested(DriftThresholdsSchema)
    versions = ma.fields.List(ma.fields.Nested(VersionDriftSchema))


@blp.route("/v1/governance/models/<name>/drift", methods=["GET"])
@require_scopes(GOVERNANCE_READ)
@blp.response(200, DriftReportSchema)
def model_drift(name: str) -> dict[str, Any]:
    """Drift of a model's live inputs against its reference profile

    Computed on request from the rolling window of recent inputs, per served version; the
    `gateway_model_drift_*` gauges are updated with the same figures.
    """
    return monitor().report(name)
