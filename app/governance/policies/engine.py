"""The policy step of the request path: decide before any model call, redact on the way out.

`check_chat` / `check_texts` apply the tenant's effective policy in this order: allowed models,
the max_tokens cap, the input size cap, then PII. A violation raises `PolicyViolation` (an
APIError carrying the blocking Decision, for the audit record); otherwise the Decision says what
the model must see. A Decision names the policy version and the detectors that fired (those set
to redact or block), never the matched text; block messages name detectors, never values.

Output redaction (rules.redact_output) covers the detectors set to redact or block: output cannot
be blocked half-way through a stream, so in output both mean redact. `OutputRedactor` redacts a
stream with a hold-back that lasts only while a candidate could still be growing: the unfinished
last word (an e-mail address, an IP address, an unbroken number), a trailing run of digit groups
(a phone, card or SSN number printed with spaces or dashes) or a trailing grouped IBAN. In prose
that is the last word, usually one token; everything before it is redacted and sent at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from flask import current_app, has_app_context

from app import tracing
from app.errors import APIError
from app.governance.policies.detectors import MAX_ENTITY_CHARS, Span, find_pii, growing_tail, redact
from app.governance.policies.rules import EffectivePolicy
from app.governance.policies.store import effective_policy
from app.identity.principal import Principal
from app.inference.catalogue import catalogue

# Raw text kept before a stream's cut, so detectors see what precedes new text ("version ...").
CONTEXT_CHARS = 64
MAX_HOLD_CHARS = MAX_ENTITY_CHARS + 2


@dataclass(frozen=True)
class Decision:
    """What the policy decided for one call; its fields go into the audit record.

    `messages` / `texts` are what the model must see instead of the request's, or None when the
    request goes through unchanged. `max_tokens` is the policy's cap, for the caller to apply
    when the client asked for none. `output_detectors` are those to redact in the output (used
    when `redact_output`). `policy_scope` tells a tenant's version N from the default's.
    """

    policy_version: int | None
    action: str  # "allow" | "redact" | "block"
    detectors: tuple[str, ...]
    messages: list[dict[str, Any]] | None
    texts: list[str] | None
    redact_output: bool
    audit_raw_content: bool
    policy_scope: str | None = None
    max_tokens: int | None = None
    output_detectors: tuple[str, ...] = ()


class PolicyViolation(APIError):
    """A request the policy refuses; `decision` records the refusal for the audit trail."""

    def __init__(self, decision: Decision, status: int, message: str, code: str, param: str) -> None:
        super().__init__(status, message, code=code, param=param)
        self.decision = decision


def _phone_regions() -> tuple[str, ...]:
    """POLICY_PHONE_REGIONS: the number plans national-format phone numbers are checked against."""
    raw = current_app.config.get("POLICY_PHONE_REGIONS", "US") if has_app_context() else "US"
    return tuple(r.strip().upper() for r in str(raw).split(",") if r.strip())


def _decision(policy: EffectivePolicy, **fields: object) -> Decision:
    rules = policy.rules
    base: dict[str, object] = {
        "policy_version": policy.version,
        "action": "allow",
        "detectors": (),
        "messages": None,
        "texts": None,
        "redact_output": rules.redact_output,
        "audit_raw_content": rules.audit_raw_content,
        "policy_scope": policy.scope,
        "max_tokens": rules.max_tokens,
        "output_detectors": rules.detectors_with("redact", "block"),
    }
    return Decision(**{**base, **fields})  # type: ignore[arg-type]


def _refuse(
    policy: EffectivePolicy, status: int, code: str, param: str, message: str, **fields: object
) -> PolicyViolation:
    decision = _decision(policy, action="block", **fields)
    return PolicyViolation(decision, status, message, code, param)


def _check_model(policy: EffectivePolicy, model: str) -> None:
    """Both sides are resolved to canonical names through the registry, at the time of the call.

    A policy may list `smollm2` while the route resolved the request to `smollm2-135m-instruct`
    (or the reverse); comparing the names as written would refuse a model the tenant may use.
    Resolving on each call, not when the policy is written, keeps a policy right when an alias
    is added later; a listed name the registry does not know stays as written.
    """
    allowed = policy.rules.allowed_models
    if allowed is None:
        return
    canonical = catalogue().canonical
    if canonical(model) not in {canonical(name) for name in allowed}:
        raise _refuse(
            policy, 403, "model_not_allowed", "model", f"This tenant's policy does not allow model '{model}'."
        )


def _check_size(policy: EffectivePolicy, texts: list[str], param: str) -> None:
    limit = policy.rules.max_input_chars
    size = sum(len(t) for t in texts)
    if limit is not None and size > limit:
        raise _refuse(
            policy,
            400,
            "policy_violation",
            param,
            f"The {param} total {size} characters; this tenant's policy allows at most {limit}.",
        )


def _scan(policy: EffectivePolicy, texts: list[str], param: str) -> tuple[tuple[str, ...], list[str] | None]:
    """Detectors that fired (redact or block) and the redacted texts (None if nothing changed)."""
    rules = policy.rules
    acting = rules.detectors_with("redact", "block")
    if not acting:
        return (), None
    regions = _phone_regions()
    spans = [[s for s in find_pii(text, regions) if s.detector in acting] for text in texts]
    fired = tuple(sorted({s.detector for found in spans for s in found}))
    blocked = [name for name in fired if rules.pii[name] == "block"]
    if blocked:
        raise _refuse(
            policy,
            400,
            "policy_violation",
            param,
            f"This tenant's policy blocks {', '.join(blocked)} in the {param}; the request was not sent.",
            detectors=fired,
        )
    if not fired:
        return (), None
    return fired, [redact(text, found) if found else text for text, found in zip(texts, spans, strict=True)]


def _with_prefix(messages: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """The prefix joins the first system message, or becomes one: many chat templates accept
    a single system message, at the start."""
    if messages and messages[0].get("role") == "system":
        first = {**messages[0], "content": f"{prefix}\n\n{messages[0]['content']}"}
        return [first, *messages[1:]]
    return [{"role": "system", "content": prefix}, *messages]


def _with_texts(
    messages: list[dict[str, Any]], contents: list[str], arguments: Iterator[str]
) -> list[dict[str, Any]]:
    """The messages with their (redacted) contents and tool-call arguments, in scan order."""
    seen = []
    for message, text in zip(messages, contents, strict=True):
        if message.get("content") is not None:
            message = {**message, "content": text}
        if message.get("tool_calls"):
            calls = [
                {**c, "function": {**c["function"], "arguments": next(arguments)}}
                for c in message["tool_calls"]
            ]
            message = {**message, "tool_calls": calls}
        seen.append(message)
    return seen


@tracing.step("policy")
def check_chat(
    principal: Principal, model: str, messages: list[dict[str, Any]], max_tokens: int | None
) -> Decision:
    """The policy step of a chat call; raises PolicyViolation, returns what the model may see.

    `model` and the policy's allowed_models are compared by canonical name (aliases resolved).
    """
    policy = effective_policy(principal.tenant_id)
    rules = policy.rules
    _check_model(policy, model)
    if rules.max_tokens is not None and max_tokens is not None and max_tokens > rules.max_tokens:
        raise _refuse(
            policy,
            400,
            "policy_violation",
            "max_tokens",
            f"max_tokens is {max_tokens}; this tenant's policy allows at most {rules.max_tokens}.",
        )
    # Tool-call arguments an assistant message carries go to the model as much as any content;
    # a message that only called tools has content null, and it stays null.
    contents = [m.get("content") or "" for m in messages]
    arguments = [c["function"]["arguments"] for m in messages for c in m.get("tool_calls") or ()]
    _check_size(policy, contents + arguments, "messages")
    fired, redacted = _scan(policy, contents + arguments, "messages")
    seen = messages
    if redacted is not None:
        seen = _with_texts(messages, redacted[: len(contents)], iter(redacted[len(contents) :]))
    if rules.system_prompt_prefix:
        seen = _with_prefix(seen, rules.system_prompt_prefix)
    return _decision(
        policy,
        action="redact" if fired else "allow",
        detectors=fired,
        messages=None if seen is messages else seen,
    )


@tracing.step("policy")
def check_texts(principal: Principal, model: str, texts: list[str]) -> Decision:
    """The policy step of embeddings and v2 BYTES inputs (param "input"); no max_tokens, no prefix."""
    policy = effective_policy(principal.tenant_id)
    _check_model(policy, model)
    _check_size(policy, texts, "input")
    fired, redacted = _scan(policy, texts, "input")
    return _decision(policy, action="redact" if fired else "allow", detectors=fired, texts=redacted)


def redact_text(decision: Decision, text: str) -> str:
    """A non-streamed output, redacted if the policy asks for it."""
    if not decision.redact_output or not decision.output_detectors:
        return text
    spans = [s for s in find_pii(text, _phone_regions()) if s.detector in decision.output_detectors]
    return redact(text, spans)


class OutputRedactor:
    """Redacts a streamed output delta by delta; `feed(d)` + ... + `flush()` equals `redact_text`.

    Each feed sends everything before the growing tail (see the module docstring), with the
    entities in it replaced; the tail waits for the next delta or `flush()`. The tail is capped
    at MAX_HOLD_CHARS, the longest entity, so an endless token cannot stall a stream. Detection
    reruns only over the held tail, the new delta and CONTEXT_CHARS of raw text before them.
    `detectors` lists what fired in the output so far, for the audit record.
    """

    def __init__(self, decision: Decision) -> None:
        self._active = decision.redact_output and bool(decision.output_detectors)
        self._acting = set(decision.output_detectors)
        self._regions = _phone_regions()
        self._context = ""
        self._pending = ""
        self._fired: set[str] = set()

    @property
    def detectors(self) -> tuple[str, ...]:
        return tuple(sorted(self._fired))

    def feed(self, delta: str) -> str:
        if not self._active:
            return delta
        self._pending += delta
        window = self._pending[-(MAX_HOLD_CHARS + 1) :]
        held = len(window) - growing_tail(window)
        return self._emit(len(self._pending) - min(held, MAX_HOLD_CHARS))

    def flush(self) -> str:
        if not self._active:
            return ""
        return self._emit(len(self._pending))

    def _emit(self, cut: int) -> str:
        """Redact and send pending[:cut]; an entity crossing the cut waits whole."""
        offset = len(self._context)
        text = self._context + self._pending
        spans = [
            Span(s.detector, s.start - offset, s.end - offset)
            for s in find_pii(text, self._regions)
            if s.detector in self._acting and s.start >= offset
        ]
        for span in spans:
            if span.start < cut < span.end:
                cut = span.start
        sent = [s for s in spans if s.end <= cut]
        self._fired.update(s.detector for s in sent)
        self._context = text[: offset + cut][-CONTEXT_CHARS:]
        out, self._pending = redact(self._pending[:cut], sent), self._pending[cut:]
        return out
