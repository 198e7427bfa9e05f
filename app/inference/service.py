"""The request path of every inference route, in order, in one place.

    authenticate -> rate limit          (require_scopes, on the view, before validation)
    -> validate                         (flask-smorest schemas, on the view)
    -> route                            (name or alias -> registry version, canary sticky per user;
                                         first, because policy judges the model actually served)
    -> policy                           (tenant policy: models, tokens, size, PII; model limits)
    -> quota reserve                    (atomic; settled to actual usage, released on failure)
    -> backend                          (local model in an OS thread, or upstream I/O on the hub)
    -> respond                          (JSON, or an SSE stream)
    -> settle                           (quota, drift, audit and metrics, however the call ended)

The functions take the principal explicitly so fan-out can run them on other greenlets.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from flask import Response, current_app, g

from app.governance import audit, drift
from app.governance.policies import engine as policies
from app.governance.policies.engine import Decision, PolicyViolation
from app.identity import quota
from app.identity.principal import Principal
from app.inference.backends.base import CHAT_OPTIONS, ChatRequest, EmbeddingResult, text_input
from app.inference.catalogue import catalogue
from app.inference.offload import run_in_thread
from app.inference.runtime import ModelRuntime
from app.inference.schemas import reject
from app.inference.streaming import chat_event_stream
from app.inference.tensors import decode_inputs, encode_outputs
from app.observability import outgoing_headers, request_id

# Chat templates add a few tokens per message (role markers, separators); 8 covers the families we know.
MESSAGE_OVERHEAD_TOKENS = 8


def token_bound(texts: list[str]) -> int:
    """An upper bound on the tokens of `texts` for a model that can't count them (remote ones).

    Byte-level tokenizers emit at most one token per UTF-8 byte, plus special tokens. Quota
    reservations must never be short, or admitted requests together overspend; settlement gives
    back what was not used.
    """
    return sum(len(t.encode()) + MESSAGE_OVERHEAD_TOKENS for t in texts)


def require_capability(runtime: ModelRuntime, capability: str) -> None:
    runtime.check_ready()
    if capability not in runtime.backend.capabilities:
        raise reject(
            "model", f"Model '{runtime.name}' does not support {capability}.", "unsupported_operation"
        )


# chat ----------------------------------------------------------------------------------------
@contextmanager
def _audited_policy() -> Iterator[None]:
    """A refusal is a decision too: its record names the policy version and the detectors.

    No input is noted: a blocked request reached no model, and the audit record stores neither
    the request's content nor its hash (see `Pending._inference`)."""
    try:
        yield
    except PolicyViolation as exc:
        _note_decision(exc.decision)
        raise


def _note_decision(decision: Decision) -> None:
    audit.note(
        policy_version=decision.policy_version,
        decision=decision.action,
        detectors=list(decision.detectors),
        raw_opt_in=decision.audit_raw_content,
    )


def _message_text(message: dict[str, Any]) -> str:
    """All the text a message gives the model: its content and the arguments of its tool calls."""
    calls = message.get("tool_calls") or ()
    return (message.get("content") or "") + "".join(c["function"]["arguments"] for c in calls)


def _chat_options(runtime: ModelRuntime, body: dict[str, Any]) -> dict[str, Any]:
    """The optional OpenAI parameters the client set, each refused by name unless this model's
    backend serves it; unset and false ones (`logprobs: false`) ask for nothing."""
    options = {k: body[k] for k in sorted(CHAT_OPTIONS) if body.get(k) is not None and body[k] is not False}
    served = runtime.backend.chat_options
    for name in options:
        if name not in served:
            raise reject(
                name,
                f"Model '{runtime.name}' does not support the '{name}' parameter.",
                "unsupported_parameter",
            )
    if "tools" not in served:
        for index, message in enumerate(body["messages"]):
            for key in ("tool_calls", "tool_call_id"):
                if key in message:
                    raise reject(
                        f"messages.{index}.{key}",
                        f"Model '{runtime.name}' does not support tools, so its messages can't carry {key}.",
                        "unsupported_parameter",
                    )
    return options


def _chat_request(
    principal: Principal, runtime: ModelRuntime, body: dict[str, Any]
) -> tuple[ChatRequest, int, Decision]:
    """Policy (the tenant's, then the model's limits); returns the request, its prompt tokens
    and the policy decision. The model only ever sees the messages the policy let through."""
    if (body.get("n") or 1) != 1:
        raise reject("n", "Only n=1 is supported.", "unsupported_value")
    options = _chat_options(runtime, body)
    messages = [dict(m) for m in body["messages"]]
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    with _audited_policy():
        decision = policies.check_chat(principal, runtime.name, messages, asked)
    _note_decision(decision)
    if options.get("logprobs") and decision.redact_output and decision.output_detectors:
        # Log probabilities carry every output token's text, which output redaction must not leak.
        raise reject(
            "logprobs",
            "This tenant's policy redacts model output, so logprobs can't be returned.",
            "unsupported_parameter",
        )
    messages = decision.messages or messages
    audit.note(input=messages)
    max_chars = runtime.spec.limit("max_input_chars", 100_000)
    if sum(len(_message_text(m)) for m in messages) > max_chars:
        raise reject(
            "messages",
            f"The messages exceed this model's limit of {max_chars} characters.",
            "context_length_exceeded",
        )
    backend = runtime.backend
    prompt_tokens = (run_in_thread if runtime.cpu_bound else lambda f, *a: f(*a))(
        backend.count_prompt_tokens, messages
    ) or 0
    context = backend.context_length()
    limit = int(runtime.spec.limit("max_tokens", 4096))
    if decision.max_tokens:
        limit = min(limit, decision.max_tokens)
    if asked is not None and asked > limit:
        raise reject("max_tokens", f"max_tokens is {asked}; this model allows at most {limit}.")
    if context is not None:
        if prompt_tokens >= context:
            raise reject(
                "messages",
                f"This model's maximum context length is {context} tokens; the messages use {prompt_tokens}.",
                "context_length_exceeded",
            )
        if asked is not None and prompt_tokens + asked > context:
            raise reject(
                "max_tokens",
                f"This model's maximum context length is {context} tokens; the messages use {prompt_tokens} "
                f"and max_tokens asks for {asked}.",
                "context_length_exceeded",
            )
        limit = min(limit, context - prompt_tokens)
    request = ChatRequest(
        messages=messages,
        max_tokens=asked or limit,
        temperature=body.get("temperature"),
        top_p=body.get("top_p"),
        stop=body.get("stop") or [],
        seed=body.get("seed"),
        user=body.get("user"),
        stream=bool(body.get("stream")),
        request_id=request_id(),
        headers=outgoing_headers(),
        options=options,
    )
    backend.check_chat(request)
    return request, prompt_tokens, decision


def _chat_need(request: ChatRequest, prompt_tokens: int) -> int:
    """What a chat may spend: its prompt (counted, or bounded when the model can't count; tool
    definitions are part of the prompt) and max_tokens."""
    texts = [_message_text(m) for m in request.messages]
    if "tools" in request.options:
        texts.append(json.dumps(request.options["tools"]))
    prompt = prompt_tokens or token_bound(texts)
    return prompt + (request.max_tokens or 0)


def _observe_prompt(principal: Principal, runtime: ModelRuntime, messages: list[dict[str, Any]]) -> None:
    """Drift sees the last user message of a call the model answered; a failed call's input
    says nothing about the traffic the model serves. One message, not the whole conversation:
    the reference sample is single requests."""
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)
    if last_user is not None:
        drift.observe_texts(principal.tenant_id, runtime.name, runtime.spec.version, [last_user], None)


def _route(principal: Principal, body: dict[str, Any]) -> ModelRuntime:
    """Canary assignment is sticky per tenant and end user (OpenAI's `user`, else the caller)."""
    runtime = catalogue().route(
        body["model"], f"{principal.tenant_id}:{body.get('user') or principal.subject}"
    )
    g.served_model = f"{runtime.name}/{runtime.spec.version}"
    audit.note(model=runtime.name, model_version=runtime.spec.version)
    return runtime


def run_chat(principal: Principal, body: dict[str, Any]) -> dict[str, Any]:
    """A non-streamed chat completion, as a JSON-ready dict."""
    runtime = _route(principal, body)
    require_capability(runtime, "chat")
    request, prompt_tokens, decision = _chat_request(principal, runtime, body)
    reservation = quota.reserve(principal, _chat_need(request, prompt_tokens))
    try:
        result = runtime.chat(request)
    except BaseException:
        reservation.release()
        raise
    reservation.settle(result.prompt_tokens + result.completion_tokens)
    _observe_prompt(principal, runtime, request.messages)
    text = None if result.text is None else policies.redact_text(decision, result.text)
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if result.tool_calls:
        message["tool_calls"] = result.tool_calls
    audit.note(
        tokens_in=result.prompt_tokens,
        tokens_out=result.completion_tokens,
        output=message if result.tool_calls else text,
    )
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": runtime.name,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": result.logprobs,
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    }


def chat_completion(principal: Principal, body: dict[str, Any]) -> dict[str, Any] | Response:
    if not body.get("stream"):
        return run_chat(principal, body)
    runtime = _route(principal, body)
    require_capability(runtime, "chat")
    request, prompt_tokens, decision = _chat_request(principal, runtime, body)
    reservation = quota.reserve(principal, _chat_need(request, prompt_tokens))
    try:
        chunks = runtime.chat_stream(request)  # admission: a full model answers 503 before any byte
    except BaseException:
        reservation.release()
        raise

    def settle(prompt: int, completion: int, output: Any, completed: bool) -> None:
        # Tokens generated before a disconnect were real work; the unused rest comes back.
        if completion:
            reservation.settle(prompt + completion)
        else:
            reservation.release()
        if completed:
            _observe_prompt(principal, runtime, request.messages)
        audit.note(
            tokens_in=prompt,
            tokens_out=completion,
            output=output,
            details={"stream": True, "completed": completed},
        )

    return chat_event_stream(
        chunks,
        completion_id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=runtime.name,
        include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
        prompt_tokens=prompt_tokens,
        interruptible=not runtime.cpu_bound,
        ping_interval=float(current_app.config["SSE_PING_INTERVAL_S"]),
        redactor=policies.OutputRedactor(decision),
        on_finish=settle,
    )


# embeddings ----------------------------------------------------------------------------------
def embed_texts(
    principal: Principal, runtime: ModelRuntime, texts: list[str], dimensions: int | None = None
) -> tuple[EmbeddingResult, list[str]]:
    """The governed core of every embedding call (the embeddings API, RAG ingestion and questions):
    the tenant's policy, a quota reservation settled to the tokens embedded, the model call and
    drift. Returns the result and the texts the model saw (redacted where the policy redacts).
    The input is noted before the model runs, so a failed call's record is of the redacted texts
    too; a caller embedding several batches for one request notes the whole input and the tokens
    when it is done."""
    with _audited_policy():
        decision = policies.check_texts(principal, runtime.name, texts)
    _note_decision(decision)
    texts = decision.texts or texts
    audit.note(input=texts)
    reservation = quota.reserve(principal, token_bound(texts))
    try:
        result = runtime.embed(texts, dimensions)
    except BaseException:
        reservation.release()
        raise
    reservation.settle(result.prompt_tokens)
    drift.observe_texts(principal.tenant_id, runtime.name, runtime.spec.version, texts, result.vectors)
    return result, texts


def run_embeddings(principal: Principal, body: dict[str, Any]) -> dict[str, Any]:
    runtime = _route(principal, body)
    require_capability(runtime, "embeddings")
    texts: list[str] = body["input"]
    max_inputs = int(runtime.spec.limit("max_inputs", 256))
    if not texts:
        raise reject("input", "input must not be empty.")
    if len(texts) > max_inputs:
        raise reject(
            "input",
            f"{len(texts)} inputs; this model takes at most {max_inputs} per request.",
            "too_many_inputs",
        )
    max_chars = int(runtime.spec.limit("max_input_chars", 20_000))
    for index, text in enumerate(texts):
        if not text:
            raise reject(f"input.{index}", "Inputs must be non-empty strings.")
        if len(text) > max_chars:
            raise reject(
                f"input.{index}",
                f"Input is {len(text)} characters; the limit is {max_chars}.",
                "context_length_exceeded",
            )
    result, texts = embed_texts(principal, runtime, texts, body.get("dimensions"))
    audit.note(tokens_in=result.prompt_tokens, tokens_out=0)
    encode_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, vector in enumerate(np.asarray(result.vectors, dtype=np.float32)):
        embedding: Any = (
            base64.b64encode(vector.astype("<f4").tobytes()).decode() if encode_base64 else vector.tolist()
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": runtime.name,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


# Open Inference Protocol ---------------------------------------------------------------------
def _apply_policy(
    principal: Principal, runtime: ModelRuntime, inputs: list[dict[str, Any]]
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """The tenant's policy on every v2 call, tabular models included; returns the arrays the
    model sees and the same as request tensors, for the audit record.

    Allowed models and the input size cap apply to every model; only text counts toward the cap
    (a numeric tensor has no characters; the model's batch limit bounds it). All BYTES tensors
    are checked as one input, so the cap covers the whole request and one decision names every
    detector that fired; redacted texts replace the originals before the model sees them.
    """
    arrays = decode_inputs(inputs, runtime.backend.inputs())
    names = [spec.name for spec in runtime.backend.inputs() if spec.datatype == "BYTES"]
    texts = {name: text_input(arrays, name) for name in names}
    with _audited_policy():
        decision = policies.check_texts(principal, runtime.name, [t for name in names for t in texts[name]])
    _note_decision(decision)
    if decision.texts is None:
        return arrays, inputs
    position = 0
    for name in names:
        redacted = np.empty(len(texts[name]), dtype=object)
        redacted[:] = decision.texts[position : position + len(texts[name])]
        arrays[name] = redacted.reshape(arrays[name].shape)
        position += len(texts[name])
    seen = [
        {**tensor, "data": text_input(arrays, tensor["name"])} if tensor["name"] in texts else tensor
        for tensor in inputs
    ]
    return arrays, seen


def _observe_drift(
    principal: Principal,
    runtime: ModelRuntime,
    arrays: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
) -> None:
    """Feed the tenant's drift window: tabular rows as they are, text inputs with any embeddings made."""
    tenant, model, version = principal.tenant_id, runtime.name, runtime.spec.version
    for spec in runtime.backend.inputs():
        array = arrays[spec.name]
        if spec.datatype == "BYTES":
            texts = text_input(arrays, spec.name)
            drift.observe_texts(tenant, model, version, texts, outputs.get("embedding"))
        elif array.ndim == 2:
            drift.observe_tabular(tenant, model, version, array)


def resolve_version(name: str, version: str | None) -> ModelRuntime:
    if version is None:
        return catalogue().get(name, param="model_name")
    return catalogue().get_version(name, version)


def run_infer(principal: Principal, name: str, version: str | None, body: dict[str, Any]) -> dict[str, Any]:
    """A v2 inference call. The audit record gets the tensors the model saw (redacted, never the
    originals) as soon as the policy has passed, so a call that fails later records them too."""
    parameters = body.get("parameters") or {}
    sticky_key = f"{principal.tenant_id}:{parameters.get('user') or principal.subject}"
    runtime = (
        catalogue().route(name, sticky_key, "model_name")
        if version is None
        else catalogue().get_version(name, version)
    )
    g.served_model = f"{runtime.name}/{runtime.spec.version}"
    audit.note(model=runtime.name, model_version=runtime.spec.version)
    require_capability(runtime, "infer")
    backend = runtime.backend
    arrays, seen = _apply_policy(principal, runtime, body["inputs"])
    audit.note(input=seen)
    outputs = runtime.infer(arrays, parameters)
    wanted = [o["name"] for o in body.get("outputs") or []]
    unknown = sorted(set(wanted) - set(outputs))
    if unknown:
        raise reject(
            "outputs", f"Unknown output(s) {', '.join(unknown)}; this model has {', '.join(outputs)}."
        )
    response: dict[str, Any] = {
        "model_name": runtime.name,
        "model_version": runtime.spec.version,
        "outputs": encode_outputs(outputs, backend.outputs(), wanted or list(outputs)),
    }
    response["id"] = body.get("id") or request_id() or uuid.uuid4().hex
    _observe_drift(principal, runtime, arrays, outputs)
    audit.note(output=response["outputs"])
    return response
