"""One loaded model: its instances, admission control, offloading, batching and metrics.

Admission is a semaphore of `max_concurrency` slots plus a bounded wait of `max_queue`
callers; past that the caller gets 503 `model_overloaded` with `Retry-After` at once, which
is what lets a load balancer or SDK retry elsewhere instead of piling up latency here.
The primitives come from `threading`, so under gevent they are cooperative and in a plain
process (tests, CLI) they are real thread primitives.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import marshmallow as ma
import numpy as np
import structlog

from app import tracing
from app.errors import APIError, flatten_messages
from app.inference import metrics
from app.inference.backends import Backend, ModelSpec, backend_class
from app.inference.backends.base import ChatChunk, ChatRequest, ChatResult, EmbeddingResult
from app.inference.batching import AdaptiveBatcher
from app.inference.offload import iterate_in_thread, run_in_thread

log = structlog.get_logger(__name__)


class ModelRuntime:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        cls = backend_class(spec.backend)
        self.cpu_bound = cls.cpu_bound
        instances = int(spec.limit("instances", 1)) if not cls.thread_safe else 1
        self.instances: list[Backend] = [cls(spec) for _ in range(instances)]
        default_concurrency = instances if not cls.thread_safe else (1 if cls.cpu_bound else 256)
        self.max_concurrency = int(spec.limit("max_concurrency", default_concurrency))
        if not cls.thread_safe:
            self.max_concurrency = min(self.max_concurrency, instances)
        self.max_queue = int(spec.limit("max_queue", 16))
        self.queue_timeout_s = float(spec.limit("queue_timeout_s", 30))
        self.state = "loading"
        self.reason = ""
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._lock = threading.Lock()
        self._waiting = 0
        self._free = list(self.instances)
        self._labels = {"model": spec.name, "version": spec.version}
        self.batcher: AdaptiveBatcher | None = None
        if "embeddings" in cls.capabilities and int(spec.limit("max_batch_size", 1)) > 1:
            self.batcher = AdaptiveBatcher(
                self,
                max_batch_size=int(spec.limit("max_batch_size", 1)),
                max_wait_ms=float(spec.limit("max_batch_wait_ms", 5)),
            )

    # lifecycle ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def backend(self) -> Backend:
        return self.instances[0]

    @property
    def ready(self) -> bool:
        return self.state == "loaded"

    def load(self) -> None:
        """Load every instance; a failure marks this model failed and leaves the others alone."""
        started = time.perf_counter()
        try:
            type(self.backend).check_params(self.spec.params)
            for instance in self.instances:
                if self.cpu_bound:
                    run_in_thread(instance.load)
                else:
                    instance.load()
        except ma.ValidationError as exc:
            problems = "; ".join(
                f"params.{d['param']}: {d['message']}" for d in flatten_messages(exc.messages)
            )
            self._failed(f"invalid params: {problems}")
            return
        except Exception as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
            return
        self.state, self.reason = "loaded", ""
        log.info(
            "model_loaded", model=self.name, version=self.spec.version, seconds=time.perf_counter() - started
        )

    def _failed(self, reason: str) -> None:
        self.state, self.reason = "failed", reason[:500]
        log.error("model_load_failed", model=self.name, version=self.spec.version, reason=self.reason)

    def close(self) -> None:
        for instance in self.instances:
            instance.close()

    # admission ---------------------------------------------------------------------------
    def _overloaded(self) -> APIError:
        metrics.ERRORS.labels(code="model_overloaded", **self._labels).inc()
        return APIError(
            503,
            f"Model '{self.name}' is at capacity; retry shortly.",
            code="model_overloaded",
            headers={"Retry-After": "1"},
        )

    def check_ready(self) -> None:
        """A model still loading or failed answers 503, before any input is looked at."""
        if not self.ready:
            detail = f": {self.reason}" if self.reason else ""
            raise APIError(
                503,
                f"Model '{self.name}' is {self.state}{detail}.",
                code="model_not_ready",
                headers={"Retry-After": "5"},
            )

    @contextmanager
    def slot(self) -> Iterator[Backend]:
        """Hold one model slot (and, for single-threaded families, one instance)."""
        self.check_ready()
        started = time.perf_counter()
        if not self._slots.acquire(blocking=False):
            with self._lock:
                if self._waiting >= self.max_queue:
                    raise self._overloaded()
                self._waiting += 1
            metrics.QUEUED.labels(**self._labels).inc()
            try:
                acquired = self._slots.acquire(timeout=self.queue_timeout_s)
            finally:
                with self._lock:
                    self._waiting -= 1
                metrics.QUEUED.labels(**self._labels).dec()
            if not acquired:
                raise self._overloaded()
        metrics.QUEUE_WAIT.labels(**self._labels).observe(time.perf_counter() - started)
        metrics.IN_USE.labels(**self._labels).inc()
        with self._lock:
            instance = self._free.pop() if len(self.instances) > 1 else self.instances[0]
        try:
            yield instance
        finally:
            with self._lock:
                if len(self.instances) > 1:
                    self._free.append(instance)
            metrics.IN_USE.labels(**self._labels).dec()
            self._slots.release()

    def _call(self, operation: str, fn: Any, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            result = run_in_thread(fn, *args) if self.cpu_bound else fn(*args)
        except APIError as exc:
            metrics.ERRORS.labels(code=exc.code or "error", **self._labels).inc()
            raise
        metrics.INFERENCE.labels(operation=operation, **self._labels).observe(time.perf_counter() - started)
        return result

    # operations --------------------------------------------------------------------------
    @tracing.step("backend")
    def chat(self, request: ChatRequest) -> ChatResult:
        with self.slot() as instance:
            result: ChatResult = self._call("chat", instance.chat, request)
        self._count_tokens(result.prompt_tokens, result.completion_tokens)
        return result

    def chat_stream(self, request: ChatRequest) -> HeldStream:
        """Admit now (so overload is a clean 503 before any byte is sent), stream later.

        The slot is held until the returned stream finishes or is closed, which is how a
        client disconnect frees the model at the next token, and a response dropped before
        its first chunk frees it at once.
        """
        slot = self.slot()
        instance = slot.__enter__()
        try:
            chunks = instance.chat_stream(request)
        except BaseException:
            slot.__exit__(None, None, None)
            raise
        return HeldStream(self, chunks, lambda: slot.__exit__(None, None, None))

    @tracing.step("backend")
    def _stream(self, release: Callable[[], None], chunks: Iterator[ChatChunk]) -> Iterator[ChatChunk]:
        started = time.perf_counter()
        iterator = iterate_in_thread(chunks) if self.cpu_bound else chunks
        try:
            for chunk in iterator:
                if chunk.finish_reason is not None:
                    self._count_tokens(chunk.prompt_tokens or 0, chunk.completion_tokens or 0)
                yield chunk
        except APIError as exc:
            metrics.ERRORS.labels(code=exc.code or "error", **self._labels).inc()
            raise
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            metrics.INFERENCE.labels(operation="chat_stream", **self._labels).observe(
                time.perf_counter() - started
            )
            release()

    @tracing.step("backend")
    def embed(self, texts: list[str], dimensions: int | None) -> EmbeddingResult:
        if self.batcher is not None:
            result = self.batcher.submit(texts, dimensions)
        else:
            with self.slot() as instance:
                metrics.BATCH_SIZE.labels(**self._labels).observe(len(texts))
                result = self._call("embeddings", instance.embed, texts, dimensions)
        self._count_tokens(result.prompt_tokens, 0)
        return result

    @tracing.step("backend")
    def infer(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
        with self.slot() as instance:
            return self._call("infer", instance.infer, inputs, parameters)

    def _count_tokens(self, prompt: int, completion: int) -> None:
        if prompt:
            metrics.TOKENS.labels(kind="prompt", **self._labels).inc(prompt)
        if completion:
            metrics.TOKENS.labels(kind="completion", **self._labels).inc(completion)


class HeldStream:
    """A stream's chunks and the model slot they hold; `close()` frees the slot in every case.

    A generator's `finally` runs only once the generator has started, and a response dropped
    before its first chunk (an after_request hook failing, the server closing it unsent) never
    starts it: the slot would stay taken for the life of the process. So the release is a
    callable run at most once, by the generator's `finally` or by `close()`, whichever comes first.
    """

    def __init__(
        self, runtime: ModelRuntime, chunks: Iterator[ChatChunk], release: Callable[[], None]
    ) -> None:
        self._lock = threading.Lock()
        self._release_slot: Callable[[], None] | None = release
        self._chunks = chunks
        self._started = False
        self._stream = runtime._stream(self._release, chunks)

    def __iter__(self) -> HeldStream:
        return self

    def __next__(self) -> ChatChunk:
        self._started = True
        return next(self._stream)

    def close(self) -> None:
        self._stream.close()  # a started stream releases in its finally; an unstarted one does nothing
        if not self._started:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        self._release()

    def _release(self) -> None:
        with self._lock:
            release, self._release_slot = self._release_slot, None
        if release is not None:
            release()
