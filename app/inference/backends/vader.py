"""Rule-based sentiment with VADER: no weights, microseconds per text, a cheap always-ready v2 model.

v2 (Open Inference Protocol): input `text` BYTES [-1]; outputs `neg`, `neu`, `pos`, `compound`,
each FP32 [-1], one value per text. Four named outputs rather than one [-1, 4] `scores` tensor,
so a client can request just `compound` and nobody has to remember a column order.
`compound` is the normalised score in [-1, 1]; VADER's authors read >= 0.05 as positive and
<= -0.05 as negative.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.inference.backends.base import Backend, ModelSpec, TensorSpec, text_input

SCORES = ("neg", "neu", "pos", "compound")


class VaderBackend(Backend):
    family = "vader"
    capabilities = frozenset({"infer"})
    cpu_bound = True
    thread_safe = True  # polarity_scores only reads the lexicon

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._analyzer: Any = None

    def load(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec("text", "BYTES", (-1,))]

    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec(name, "FP32", (-1,)) for name in SCORES]

    def infer(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
        scores = [self._analyzer.polarity_scores(text) for text in text_input(inputs, "text")]
        return {name: np.array([s[name] for s in scores], dtype=np.float32) for name in SCORES}
