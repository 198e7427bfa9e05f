"""The one interface every model family implements (in the way of Seldon MLServer runtimes).

Backends are plain blocking code. The runtime around them decides where they run: families
marked `cpu_bound` are called in real OS threads so the gevent hub stays responsive; remote
families do cooperative I/O on the hub. Concurrency limits, queues, batching, deadlines and
metrics also live in the runtime, so a new family only implements what it can do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import marshmallow as ma
import numpy as np

from app.errors import APIError


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the model catalogue (config/models.yaml, later the registry)."""

    name: str
    version: str
    backend: str
    params: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    description: str = ""

    def limit(self, key: str, default: Any) -> Any:
        return self.limits.get(key, default)


# OpenAI chat parameters beyond the common core; a backend lists in `chat_options` those it
# serves, and the service refuses the others by name (400 `unsupported_parameter`).
CHAT_OPTIONS = frozenset(
    {
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "logprobs",
        "top_logprobs",
        "presence_penalty",
        "frequency_penalty",
    }
)


@dataclass
class ChatRequest:
    """`messages` are OpenAI's (assistant `tool_calls`, `tool` results included); `options` holds
    the CHAT_OPTIONS the client set, already checked against the backend's `chat_options`."""

    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    user: str | None = None
    stream: bool = False
    request_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatChunk:
    """A piece of a reply. The last chunk of a stream carries finish_reason and usage.

    `tool_calls` and `logprobs` are the delta's, as OpenAI streams them (tool calls in pieces
    keyed by `index`), relayed unchanged."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: dict[str, Any] | None = None


@dataclass
class ChatResult:
    """`text` is None when the model only called tools (OpenAI's `content: null`)."""

    text: str | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tool_calls: list[dict[str, Any]] | None = None
    logprobs: dict[str, Any] | None = None


@dataclass
class EmbeddingResult:
    vectors: np.ndarray  # (n, dims) float32
    prompt_tokens: int
    token_counts: list[int] | None = None  # per input, so a batch's usage splits exactly


@dataclass(frozen=True)
class TensorSpec:
    """Open Inference Protocol tensor metadata; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class NoParams(ma.Schema):
    """A family that takes no params: any key given is a mistake, refused by name."""


class Backend:
    """Base class of a model family. Override only the capabilities the family has.

    `params_schema` is the family's own description of its `params`: the registry checks a new
    version's params with it before storing the version (a 400 naming the field), and the runtime
    checks them again before loading, so a bad catalogue entry fails that model with the same
    message instead of taking a worker's readiness down with an error from deep inside `load`.
    Unknown keys are refused, so a misspelt param is an error and not a silent default.
    """

    family: ClassVar[str] = ""
    params_schema: ClassVar[type[ma.Schema]] = NoParams
    capabilities: ClassVar[frozenset[str]] = frozenset()  # subset of {"chat", "embeddings", "infer"}
    chat_options: ClassVar[frozenset[str]] = frozenset()  # subset of CHAT_OPTIONS
    cpu_bound: ClassVar[bool] = True
    thread_safe: ClassVar[bool] = True  # False: one call at a time per instance

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Raise marshmallow's ValidationError, keyed by param name, if `params` can't work."""
        cls.params_schema().load(params)

    def load(self) -> None:
        """Blocking; called once, off the request path, before the model is marked ready."""

    def close(self) -> None:
        """Release native resources and connections."""

    # chat -------------------------------------------------------------------------------
    def context_length(self) -> int | None:
        return None

    def check_chat(self, request: ChatRequest) -> None:
        """Refuse, before a slot or quota is taken, what this family can't serve in a valid request."""

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int | None:
        """Token count of the rendered prompt, or None if the family can't tell cheaply."""
        return None

    def chat_stream(self, request: ChatRequest) -> Iterator[ChatChunk]:
        raise _unsupported(self.spec.name, "chat")

    def chat(self, request: ChatRequest) -> ChatResult:
        """Default: drain the stream. Remote families override with one non-streamed call."""
        parts: list[str] = []
        last = ChatChunk()
        for chunk in self.chat_stream(request):
            parts.append(chunk.text)
            last = chunk
        return ChatResult(
            text="".join(parts),
            finish_reason=last.finish_reason or "stop",
            prompt_tokens=last.prompt_tokens or 0,
            completion_tokens=last.completion_tokens or 0,
        )

    # embeddings -------------------------------------------------------------------------
    def embedding_dimensions(self) -> int | None:
        return None

    def embed(self, texts: list[str], dimensions: int | None = None) -> EmbeddingResult:
        raise _unsupported(self.spec.name, "embeddings")

    # Open Inference Protocol ------------------------------------------------------------
    def inputs(self) -> list[TensorSpec]:
        return []

    def outputs(self) -> list[TensorSpec]:
        return []

    def infer(self, inputs: dict[str, np.ndarray], parameters: dict[str, Any]) -> dict[str, np.ndarray]:
        raise _unsupported(self.spec.name, "v2 inference")


def text_input(inputs: dict[str, np.ndarray], name: str) -> list[str]:
    """A v2 BYTES tensor as Python strings; JSON clients send str, binary clients send UTF-8 bytes."""
    if name not in inputs:
        raise APIError(400, f"Missing input '{name}'.", param=name)
    values = np.asarray(inputs[name], dtype=object).reshape(-1)
    try:
        return [v.decode("utf-8") if isinstance(v, bytes | bytearray) else str(v) for v in values]
    except UnicodeDecodeError:
        raise APIError(400, f"Input '{name}' must be UTF-8 text.", param=name) from None


def _unsupported(model: str, operation: str) -> APIError:
    message = f"Model '{model}' does not support {operation}."
    return APIError(400, message, code="unsupported_operation", param="model")


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Register a family in-process (class decorator); installed families come from entry points."""
    if not cls.family:
        raise TypeError(f"{cls.__name__} has no family name")
    BACKENDS[cls.family] = cls
    return cls
