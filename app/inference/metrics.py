"""Per-model Prometheus metrics; multiprocess-safe (gauges declare how workers combine)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LABELS = ("model", "version")

QUEUE_WAIT = Histogram(
    "gateway_model_queue_wait_seconds",
    "Time a call waited for a free model slot.",
    LABELS,
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
INFERENCE = Histogram(
    "gateway_model_inference_seconds",
    "Time a model spent on one call (a whole stream for streams).",
    (*LABELS, "operation"),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TOKENS = Counter("gateway_model_tokens_total", "Tokens processed.", (*LABELS, "kind"))
BATCH_SIZE = Histogram(
    "gateway_model_batch_size",
    "Inputs per backend call after adaptive batching.",
    LABELS,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
ERRORS = Counter("gateway_model_errors_total", "Failed model calls by error code.", (*LABELS, "code"))
IN_USE = Gauge("gateway_model_slots_in_use", "Model slots busy.", LABELS, multiprocess_mode="livesum")
QUEUED = Gauge("gateway_model_queue_depth", "Calls waiting for a slot.", LABELS, multiprocess_mode="livesum")
RAG_RETRIEVAL = Histogram(
    "gateway_rag_retrieval_seconds",
    "Time a vector store took to find a query's nearest chunks (the query already embedded).",
    ("store",),
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
RAG_CHUNKS = Counter("gateway_rag_chunks_ingested_total", "Chunks embedded and stored.", ("store",))
