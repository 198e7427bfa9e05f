"""The model families against their real models: no mocks, each model loaded once per module."""

from __future__ import annotations

import hashlib
import inspect
import json
import operator
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flask import Flask

from app.errors import APIError
from app.inference.backends import ModelSpec
from app.inference.backends.base import ChatRequest
from app.inference.backends.llama_cpp import LlamaCppBackend
from app.inference.backends.sentence_transformers import SentenceTransformersBackend
from app.inference.backends.sklearn import ArtifactIntegrityError, SklearnBackend
from app.inference.backends.vader import VaderBackend
from app.inference.cli import models_cli
from app.inference.training import build_default_models, default_model_dir

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def loaded(cls, name: str, **params):
    backend = cls(ModelSpec(name=name, version="1", backend=cls.family, params=params))
    backend.load()
    return backend


@pytest.fixture(scope="module")
def smollm():
    backend = loaded(LlamaCppBackend, "smollm2", n_ctx=2048, n_threads=2, seed=0)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def minilm():
    return loaded(SentenceTransformersBackend, "minilm")


@pytest.fixture(scope="module")
def vader():
    return loaded(VaderBackend, "vader")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    build_default_models(path)
    return path


@pytest.fixture(scope="module")
def default_metadata(models_dir: Path) -> dict:
    return json.loads((default_model_dir(models_dir) / "metadata.json").read_text())


@pytest.fixture(scope="module")
def classifier(models_dir: Path, default_metadata: dict):
    artifact = default_model_dir(models_dir) / "model.skops"
    return loaded(SklearnBackend, "breast-cancer", artifact=str(artifact), sha256=default_metadata["sha256"])


@pytest.fixture(scope="module")
def breast_cancer():
    from sklearn.datasets import load_breast_cancer

    return load_breast_cancer()


def test_discovery_imports_no_heavy_library() -> None:
    """Backends register at import; the libraries they wrap must wait for load()."""
    code = (
        "import json, sys; from app.inference.backends import BACKENDS, _discover; _discover(); "
        "print(json.dumps([sorted(BACKENDS), sorted({m.split('.')[0] for m in sys.modules})]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    families, modules = json.loads(out)
    assert {"llama_cpp", "sentence_transformers", "vader", "sklearn"} <= set(families)
    heavy = {
        "torch",
        "llama_cpp",
        "sentence_transformers",
        "transformers",
        "sklearn",
        "skops",
        "vaderSentiment",
    }
    assert not heavy & set(modules), f"imported at discovery: {heavy & set(modules)}"


# llama_cpp ------------------------------------------------------------------------------------


def test_smollm_answers_and_stream_matches_non_streamed(smollm: LlamaCppBackend) -> None:
    request = ChatRequest(messages=FRANCE, max_tokens=32, temperature=0, seed=0)
    chunks = list(smollm.chat_stream(request))
    *tokens, final = chunks
    text = "".join(c.text for c in tokens)
    assert "Paris" in text
    assert all(c.text and c.finish_reason is None for c in tokens)
    assert final.text == "" and final.finish_reason == "stop"

    reference = smollm._llm.create_chat_completion(messages=FRANCE, max_tokens=32, temperature=0, seed=0)
    assert text == reference["choices"][0]["message"]["content"]
    assert final.prompt_tokens == reference["usage"]["prompt_tokens"] == smollm.count_prompt_tokens(FRANCE)
    assert final.completion_tokens == reference["usage"]["completion_tokens"]

    result = smollm.chat(request)
    assert (result.text, result.finish_reason) == (text, "stop")


def test_smollm_max_tokens_reports_length(smollm: LlamaCppBackend) -> None:
    result = smollm.chat(ChatRequest(messages=FRANCE, max_tokens=3, temperature=0))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 3


def test_closing_the_stream_stops_generation(smollm: LlamaCppBackend) -> None:
    story = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]
    stream = smollm.chat_stream(ChatRequest(messages=story, max_tokens=512, temperature=0.8))
    first = [next(stream).text for _ in range(3)]
    assert all(first)
    evaluated = smollm._llm.n_tokens
    stream.close()
    assert inspect.getgeneratorstate(stream) == inspect.GEN_CLOSED

    cpu = time.process_time()
    time.sleep(0.3)
    assert time.process_time() - cpu < 0.1, "llama.cpp kept computing after close()"
    assert smollm._llm.n_tokens == evaluated

    # The instance is left consistent for the next caller.
    answer = smollm.chat(ChatRequest(messages=FRANCE, max_tokens=32, temperature=0))
    assert "Paris" in answer.text


def test_prompt_longer_than_context_is_refused_before_generating(smollm: LlamaCppBackend) -> None:
    assert smollm.count_prompt_tokens(FRANCE) > 0
    long = [{"role": "user", "content": "hello " * 3000}]
    assert smollm.count_prompt_tokens(long) > smollm.context_length() == 2048
    with pytest.raises(APIError) as excinfo:
        next(smollm.chat_stream(ChatRequest(messages=long, max_tokens=8)))
    assert (excinfo.value.status, excinfo.value.code) == (400, "context_length_exceeded")


# sentence_transformers ----------------------------------------------------------------------

PAIR = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]


def test_minilm_similarity_ranks_related_pair_higher(minilm: SentenceTransformersBackend) -> None:
    result = minilm.embed(PAIR)
    v = result.vectors
    assert v.dtype == np.float32 and v.shape == (3, 384) == (3, minilm.embedding_dimensions())
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    assert result.token_counts == [9, 7, 8]  # word pieces plus [CLS] and [SEP] per text
    assert result.prompt_tokens == 24


def test_minilm_truncated_dimensions_are_renormalised(minilm: SentenceTransformersBackend) -> None:
    full = minilm.embed(PAIR).vectors
    short = minilm.embed(PAIR, dimensions=128).vectors
    assert short.shape == (3, 128)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1, atol=1e-5)
    prefix = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    np.testing.assert_allclose(short, prefix, atol=1e-5)
    assert short[0] @ short[1] > short[0] @ short[2]


def test_minilm_rejects_more_dimensions_than_native(minilm: SentenceTransformersBackend) -> None:
    with pytest.raises(APIError) as excinfo:
        minilm.embed(["hi"], dimensions=1000)
    assert (excinfo.value.status, excinfo.value.param) == (400, "dimensions")


def test_minilm_v2_infer(minilm: SentenceTransformersBackend) -> None:
    assert [s.as_dict() for s in minilm.inputs()] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert [s.as_dict() for s in minilm.outputs()] == [
        {"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}
    ]
    texts = np.array([PAIR[0].encode(), PAIR[1]], dtype=object)
    out = minilm.infer({"text": texts}, {})
    np.testing.assert_allclose(out["embedding"], minilm.embed(PAIR[:2]).vectors, atol=1e-5)
    with pytest.raises(APIError) as excinfo:
        minilm.infer({"text": np.array([b"\xff\xfe"], dtype=object)}, {})
    assert (excinfo.value.status, excinfo.value.param) == (400, "text")


# vader ----------------------------------------------------------------------------------------


def test_vader_sentiment_signs(vader: VaderBackend) -> None:
    assert [s.name for s in vader.outputs()] == ["neg", "neu", "pos", "compound"]
    texts = np.array([b"I love this, it is wonderful!", "This is terrible, I hate it."], dtype=object)
    out = vader.infer({"text": texts}, {})
    assert all(out[name].dtype == np.float32 and out[name].shape == (2,) for name in out)
    assert out["compound"][0] > 0 > out["compound"][1]
    np.testing.assert_allclose(out["neg"] + out["neu"] + out["pos"], 1, atol=1e-3)


# sklearn --------------------------------------------------------------------------------------


def test_default_model_build(models_dir: Path, default_metadata: dict) -> None:
    artifact = default_model_dir(models_dir) / "model.skops"
    print(f"breast-cancer held-out accuracy: {default_metadata['heldout_accuracy']:.4f}")
    assert default_metadata["heldout_accuracy"] >= 0.9
    assert default_metadata["sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert default_metadata["n_features"] == len(default_metadata["feature_names"]) == 30
    assert default_metadata["class_names"] == ["malignant", "benign"]
    profile = default_metadata["reference_profile"]
    assert len(profile["features"]) == 30
    for feature in profile["features"]:
        assert len(feature["proportions"]) == len(feature["edges"]) + 1 <= 10
        assert sum(feature["proportions"]) == pytest.approx(1)

    mtime = artifact.stat().st_mtime_ns
    assert build_default_models(models_dir) == default_metadata  # idempotent: nothing retrained
    assert artifact.stat().st_mtime_ns == mtime


def test_classifier_infers(classifier: SklearnBackend, breast_cancer, default_metadata: dict) -> None:
    assert [s.as_dict() for s in classifier.inputs()] == [
        {"name": "input__0", "datatype": "FP64", "shape": [-1, 30]}
    ]
    assert [s.as_dict() for s in classifier.outputs()] == [
        {"name": "predict", "datatype": "INT64", "shape": [-1]},
        {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 2]},
    ]
    rows = np.r_[breast_cancer.data[:3], breast_cancer.data[-3:]].astype(np.float32)
    out = classifier.infer({"input__0": rows}, {})
    assert out["predict"].dtype == np.int64 and out["predict"].shape == (6,)
    assert out["predict_proba"].shape == (6, 2)
    np.testing.assert_allclose(out["predict_proba"].sum(axis=1), 1)
    np.testing.assert_array_equal(out["predict"], out["predict_proba"].argmax(axis=1))
    assert (out["predict"] == np.r_[breast_cancer.target[:3], breast_cancer.target[-3:]]).mean() >= 5 / 6


@pytest.mark.parametrize(
    "rows", [np.zeros((2, 29)), np.zeros(30), np.full((1, 30), np.nan)], ids=["29-features", "1-d", "nan"]
)
def test_classifier_rejects_bad_input(classifier: SklearnBackend, rows: np.ndarray) -> None:
    with pytest.raises(APIError) as excinfo:
        classifier.infer({"input__0": rows}, {})
    assert (excinfo.value.status, excinfo.value.param) == (400, "input__0")


def test_tampered_or_mispinned_artifact_fails_to_load(
    models_dir: Path, default_metadata: dict, tmp_path: Path
) -> None:
    original = (default_model_dir(models_dir) / "model.skops").read_bytes()
    tampered = tmp_path / "tampered.skops"
    tampered.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    with pytest.raises(ArtifactIntegrityError, match="sha256"):
        loaded(SklearnBackend, "bc", artifact=str(tampered), sha256=default_metadata["sha256"])

    intact = tmp_path / "intact.skops"
    intact.write_bytes(original)
    with pytest.raises(ArtifactIntegrityError, match="sha256"):
        loaded(SklearnBackend, "bc", artifact=str(intact), sha256="0" * 64)


def test_extra_types_are_trusted_only_for_a_pinned_artifact(breast_cancer, tmp_path: Path) -> None:
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    model = make_pipeline(FunctionTransformer(operator.neg), StandardScaler(), LogisticRegression())
    model.fit(breast_cancer.data, breast_cancer.target)
    path = tmp_path / "custom.skops"
    sio.dump(model, path)

    with pytest.raises(ArtifactIntegrityError, match=r"_operator\.neg"):
        loaded(SklearnBackend, "custom", artifact=str(path))
    pinned = loaded(
        SklearnBackend, "custom", artifact=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest()
    )
    assert pinned.infer({"input__0": breast_cancer.data[:2]}, {})["predict"].shape == (2,)


def test_build_defaults_cli(tmp_path: Path) -> None:
    app = Flask(__name__)
    app.config["MODELS_DIR"] = str(tmp_path)
    app.cli.add_command(models_cli)
    runner = app.test_cli_runner()
    artifact = tmp_path / "breast-cancer" / "1" / "model.skops"

    built = runner.invoke(args=["models", "build-defaults"])
    assert built.exit_code == 0, built.output
    line = built.output.strip()
    assert "\n" not in line and line.startswith(f"built {artifact} sha256=")
    assert "heldout_accuracy=0.9" in line

    assert runner.invoke(args=["models", "build-defaults"]).exit_code == 1
    kept = runner.invoke(args=["models", "build-defaults", "--if-missing"])
    assert kept.exit_code == 0 and kept.output.replace("kept", "built", 1) == built.output
    rebuilt = runner.invoke(args=["models", "build-defaults", "--force"])
    assert rebuilt.exit_code == 0 and rebuilt.output.startswith("built ")
    assert runner.invoke(args=["models", "build-defaults", "--force", "--if-missing"]).exit_code == 2
