"""Build the gateway's default tabular model, so a fresh install serves v2 inference with no download.

The classifier is trained on scikit-learn's bundled breast-cancer data and written with skops to
`<MODELS_DIR>/breast-cancer/1/model.skops`, next to a `metadata.json` holding what serving and
governance need later: the artifact's sha256 (to pin in the catalogue), held-out accuracy, the
feature and class names, library versions, and the training data's reference profile for drift
monitoring.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAME = "breast-cancer"
MODEL_VERSION = "1"
ARTIFACT = "model.skops"
METADATA = "metadata.json"
SEED = 42
TEST_SIZE = 0.25
PROFILE_BINS = 10


def default_model_dir(models_dir: Path) -> Path:
    return Path(models_dir) / MODEL_NAME / MODEL_VERSION


def default_model_exists(models_dir: Path) -> bool:
    directory = default_model_dir(models_dir)
    return (directory / ARTIFACT).is_file() and (directory / METADATA).is_file()


def build_default_models(models_dir: Path, force: bool = False) -> dict[str, Any]:
    """Train, evaluate and save the default classifier; with force=False an existing build is kept."""
    directory = default_model_dir(models_dir)
    if not force and default_model_exists(models_dir):
        return json.loads((directory / METADATA).read_text())

    import sklearn
    import skops
    import skops.io as sio
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=TEST_SIZE, stratify=data.target, random_state=SEED
    )
    pipeline = Pipeline([("scale", StandardScaler()), ("classify", LogisticRegression(max_iter=1000))])
    pipeline.fit(x_train, y_train)
    accuracy = float(accuracy_score(y_test, pipeline.predict(x_test)))

    payload = sio.dumps(pipeline)
    feature_names = [str(name) for name in data.feature_names]
    metadata = {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "backend": "sklearn",
        "artifact": ARTIFACT,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "estimator": "Pipeline(StandardScaler, LogisticRegression)",
        "dataset": "sklearn.datasets.load_breast_cancer",
        "split": {"test_size": TEST_SIZE, "stratified": True, "random_state": SEED},
        "n_train": len(y_train),
        "n_test": len(y_test),
        "heldout_accuracy": accuracy,
        "n_features": len(feature_names),
        "feature_names": feature_names,
        "classes": [int(c) for c in pipeline.classes_],
        "class_names": [str(name) for name in data.target_names],
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sklearn_version": sklearn.__version__,
        "skops_version": skops.__version__,
        "numpy_version": np.__version__,
        "reference_profile": reference_profile(x_train, y_train, feature_names),
    }
    directory.mkdir(parents=True, exist_ok=True)
    # Artifact first, metadata last: metadata.json marks a complete build (see default_model_exists).
    _write_atomic(directory / ARTIFACT, payload)
    _write_atomic(directory / METADATA, json.dumps(metadata, indent=2).encode())
    return metadata


def reference_profile(x: np.ndarray, y: np.ndarray, feature_names: list[str]) -> dict[str, Any]:
    """Training-data distribution that drift statistics (PSI, chi-squared) compare live traffic with.

    Per feature, `edges` are the inner cut points of PROFILE_BINS quantile bins and `proportions`
    the training share per bin. A value's bin is `numpy.digitize(value, edges)`: the outer bins are
    open-ended, so live values outside the training range still land in a bin. Tied quantiles
    (discrete features) merge, so such a feature has fewer bins.
    """
    features = []
    for name, column in zip(feature_names, x.T, strict=True):
        edges = np.unique(np.quantile(column, np.linspace(0, 1, PROFILE_BINS + 1)[1:-1]))
        counts = np.bincount(np.digitize(column, edges), minlength=len(edges) + 1)
        features.append(
            {"name": name, "edges": edges.tolist(), "proportions": (counts / len(column)).tolist()}
        )
    labels, label_counts = np.unique(y, return_counts=True)
    return {
        "bins": PROFILE_BINS,
        "binning": "numpy.digitize(value, edges)",
        "n": len(x),
        "features": features,
        "class_proportions": {
            str(int(c)): float(n / len(y)) for c, n in zip(labels, label_counts, strict=True)
        },
    }


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` in one step, so a worker loading the model never reads a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; serving may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
