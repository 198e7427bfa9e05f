"""Adaptive micro-batching for embeddings, in the way of MLServer's adaptive batching.

Concurrent requests are queued; a batch closes when it holds `max_batch_size` inputs or
when `max_wait_ms` has passed since its first request arrived, whichever comes first. One
forward pass over 32 sentences costs far less than 32 passes of one, so under load this
multiplies throughput, while a lone request waits at most `max_wait_ms`.

Written here rather than taken from a library because it must cooperate with gevent (the
waiting is on patched `threading` primitives) and hand the forward pass to a real thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from app.inference import metrics
from app.inference.backends.base import EmbeddingResult

if TYPE_CHECKING:
    from app.inference.runtime import ModelRuntime


@dataclass
class _Item:
    texts: list[str]
    dimensions: int | None
    done: threading.Event = field(default_factory=threading.Event)
    result: EmbeddingResult | None = None
    error: BaseException | None = None


class AdaptiveBatcher:
    def __init__(self, runtime: ModelRuntime, max_batch_size: int, max_wait_ms: float) -> None:
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._pending: deque[tuple[float, _Item]] = deque()
        self._cond = threading.Condition()
        self._workers: list[threading.Thread] = []

    def _start(self) -> None:
        # One collector per slot, so `max_concurrency` batches can run at once.
        while len(self._workers) < self.runtime.max_concurrency:
            worker = threading.Thread(target=self._run, daemon=True, name=f"batcher-{self.runtime.name}")
            worker.start()
            self._workers.append(worker)

    def submit(self, texts: list[str], dimensions: int | None) -> EmbeddingResult:
        """Queue the texts for the next batch; the model's admission limits hold here too.

        Requests waiting for a batch are bounded by `max_queue` plus one batch's worth (the
        batch being formed is the point of waiting), and none waits longer than
        `queue_timeout_s`: both answer 503 `model_overloaded`, like every other model's slots.
        """
        item = _Item(texts, dimensions)
        with self._cond:
            if len(self._pending) >= self.runtime.max_queue + self.max_batch_size:
                raise self.runtime._overloaded()
            if not self._workers:
                self._start()
            self._pending.append((time.monotonic(), item))
            self._cond.notify()
        if not item.done.wait(self.runtime.queue_timeout_s):
            with self._cond:
                entry = next((e for e in self._pending if e[1] is item), None)
                if entry is not None:
                    self._pending.remove(entry)
            if entry is not None:
                raise self.runtime._overloaded()
            item.done.wait()  # already in a running batch: its answer is moments away
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def _take_batch(self) -> list[_Item]:
        with self._cond:
            while not self._pending:
                self._cond.wait()
            first_arrival = self._pending[0][0]
            while True:
                queued = sum(len(item.texts) for _, item in self._pending)
                remaining = first_arrival + self.max_wait_s - time.monotonic()
                if queued >= self.max_batch_size or remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[_Item] = []
            size = 0
            while self._pending and (
                not batch or size + len(self._pending[0][1].texts) <= self.max_batch_size
            ):
                _, item = self._pending.popleft()
                batch.append(item)
                size += len(item.texts)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            by_dims: dict[int | None, list[_Item]] = {}
            for item in batch:
                by_dims.setdefault(item.dimensions, []).append(item)
            for dimensions, items in by_dims.items():
                self._execute(items, dimensions)

    def _execute(self, items: list[_Item], dimensions: int | None) -> None:
        texts = [text for item in items for text in item.texts]
        try:
            with self.runtime.slot() as instance:
                metrics.BATCH_SIZE.labels(model=self.runtime.name, version=self.runtime.spec.version).observe(
                    len(texts)
                )
                result: EmbeddingResult = self.runtime._call("embeddings", instance.embed, texts, dimensions)
        except BaseException as exc:
            for item in items:
                item.error = exc
                item.done.set()
            return
        per_input = result.token_counts
        shares = None if per_input else _spread(result.prompt_tokens, [len(item.texts) for item in items])
        offset = 0
        for index, item in enumerate(items):
            n = len(item.texts)
            tokens = sum(per_input[offset : offset + n]) if per_input else shares[index]  # type: ignore[index]
            item.result = EmbeddingResult(
                vectors=np.asarray(result.vectors[offset : offset + n]), prompt_tokens=tokens
            )
            offset += n
            item.done.set()


def _spread(total: int, sizes: list[int]) -> list[int]:
    """Split a batch's token count by input count when the backend gives no per-input counts."""
    inputs = sum(sizes) or 1
    return [round(total * size / inputs) for size in sizes]
