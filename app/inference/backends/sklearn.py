"""Tabular scikit-learn classifiers stored with skops (never pickle: loading a pickle runs its code).

params:
  artifact  path to a .skops file, absolute or relative to the working directory.
  sha256    expected hex digest of the file; on mismatch `load()` fails and the model never serves.

Trust: skops refuses types outside its safe defaults unless they are listed as trusted. The
types the file asks for are trusted only when `sha256` pins the file, i.e. the operator vouched
for these exact bytes; without a pin such a file is refused. Everything trusted is logged.

v2 (Open Inference Protocol): input `input__0` FP64 (FP32 accepted) [-1, n_features]; outputs
`predict` INT64 [-1] (class labels) and `predict_proba` FP64 [-1, n_classes] (columns follow
the label order, ascending).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import marshmallow as ma
import numpy as np
import structlog

from app.errors import APIError
from app.inference.backends.base import Backend, ModelSpec, TensorSpec

log = structlog.get_logger(__name__)

INPUT = "input__0"


class ArtifactIntegrityError(RuntimeError):
    """The artifact is not the one the catalogue vouches for, or asks for types nobody trusted."""


class SklearnParams(ma.Schema):
    """The registry stores these two as a version's `artifact_uri` and `artifact_sha256`."""

    artifact = ma.fields.String(required=True, validate=ma.validate.Length(min=1))
    sha256 = ma.fields.String(validate=ma.validate.Regexp(r"^[0-9a-fA-F]{64}$"))
    reference_profile = ma.fields.Dict(
        metadata={"description": "Drift reference; default: the artifact's metadata.json profile."}
    )


class SklearnBackend(Backend):
    family = "sklearn"
    params_schema = SklearnParams
    capabilities = frozenset({"infer"})
    cpu_bound = True
    thread_safe = True  # predict/predict_proba of a fitted estimator only read it

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._model: Any = None
        self.n_features = -1
        self.n_classes = -1

    def load(self) -> None:
        import skops.io as sio

        if not self.spec.params.get("artifact"):
            raise ValueError(f"model '{self.spec.name}': params.artifact is required")
        path = Path(self.spec.params["artifact"])
        # Hash and deserialise the same bytes: re-reading the file after the check would let it
        # be swapped in between.
        data = path.read_bytes()
        expected = str(self.spec.params.get("sha256") or "").lower()
        if expected:
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise ArtifactIntegrityError(
                    f"{path}: sha256 is {actual}, catalogue expects {expected}; refusing to load"
                )
        trusted = sio.get_untrusted_types(data=data)
        if trusted and not expected:
            raise ArtifactIntegrityError(
                f"{path} needs types outside skops' safe defaults ({', '.join(trusted)}); "
                "pin its sha256 in the catalogue to trust them"
            )
        log.info("skops_load", model=self.spec.name, path=str(path), pinned=bool(expected), trusted=trusted)
        model = sio.loads(data, trusted=trusted)
        classes = getattr(model, "classes_", None)
        if not hasattr(model, "predict_proba") or classes is None or not hasattr(model, "n_features_in_"):
            raise TypeError(f"{path}: {type(model).__name__} is not a fitted probabilistic classifier")
        if not np.issubdtype(np.asarray(classes).dtype, np.integer):
            raise TypeError(f"{path}: class labels must be integers for the INT64 'predict' output")
        self.n_features = int(model.n_features_in_)
        self.n_classes = len(classes)
        self._model = model

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(INPUT, "FP64", (-1, self.n_features))]

    def outputs(self) -> list[TensorSpec]:
        return [
            TensorSpec("predict", "INT64", (-1,)),
            TensorSpec("predict_proba", "FP64", (-1, self.n_classes)),
        ]

    def infer(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
        if INPUT not in inputs:
            raise APIError(400, f"Missing input '{INPUT}'.", param=INPUT)
        try:
            x = np.asarray(inputs[INPUT], dtype=np.float64)
        except (TypeError, ValueError):
            raise APIError(400, f"Input '{INPUT}' must be numeric.", param=INPUT) from None
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise APIError(
                400,
                f"Input '{INPUT}' must have shape [-1, {self.n_features}] "
                f"({self.n_features} features per row); got {list(x.shape)}.",
                param=INPUT,
            )
        if not np.isfinite(x).all():
            raise APIError(400, f"Input '{INPUT}' contains NaN or infinite values.", param=INPUT)
        return {
            "predict": self._model.predict(x).astype(np.int64),
            "predict_proba": self._model.predict_proba(x).astype(np.float64),
        }
