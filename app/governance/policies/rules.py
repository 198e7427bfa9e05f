"""What a policy version says, validated once on the way in and frozen for the request path.

Each version is a complete document: fields a PUT leaves out take the built-in permissive
defaults, never the previous version's or the platform default's values, so a version number
alone names every rule that decided a request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import marshmallow as ma

from app.fields import StrictBoolean, StrictInteger
from app.governance.policies.detectors import DETECTORS

ACTIONS: tuple[str, ...] = ("allow", "redact", "block")
DEFAULT_SCOPE = "default"


def _all_allowed() -> dict[str, str]:
    return dict.fromkeys(DETECTORS, "allow")


class PiiRulesSchema(ma.Schema):
    """One action per detector; an unknown detector name is a 422 naming the field."""

    email = ma.fields.String(load_default="allow", validate=ma.validate.OneOf(ACTIONS))
    phone = ma.fields.String(load_default="allow", validate=ma.validate.OneOf(ACTIONS))
    credit_card = ma.fields.String(load_default="allow", validate=ma.validate.OneOf(ACTIONS))
    iban = ma.fields.String(load_default="allow", validate=ma.validate.OneOf(ACTIONS))
    ssn = ma.fields.String(load_default="allow", validate=ma.validate.OneOf(ACTIONS))
    ip_address = ma.fields.String(load_default="allow", validate=ma.validate.OneOf(ACTIONS))


class RulesSchema(ma.Schema):
    allowed_models = ma.fields.List(
        ma.fields.String(validate=ma.validate.Length(min=1, max=128)),
        allow_none=True,
        load_default=None,
        metadata={
            "description": "Models the tenant may call, by name or alias (an alias stands for "
            "its model); null = all."
        },
    )
    max_tokens = StrictInteger(
        allow_none=True,
        load_default=None,
        validate=ma.validate.Range(min=1),
        metadata={"description": "Cap on a request's max_tokens; null = the model's own limit."},
    )
    max_input_chars = StrictInteger(
        allow_none=True,
        load_default=None,
        validate=ma.validate.Range(min=1),
        metadata={"description": "Cap on the characters of a request's messages or inputs, summed."},
    )
    system_prompt_prefix = ma.fields.String(
        allow_none=True,
        load_default=None,
        validate=ma.validate.Length(min=1, max=20_000),
        metadata={"description": "Prepended to the system message (or sent as one) on every chat call."},
    )
    pii = ma.fields.Nested(
        PiiRulesSchema,
        load_default=_all_allowed,
        metadata={"description": f"Action per detector ({', '.join(ACTIONS)}); omitted = allow."},
    )
    redact_output = StrictBoolean(
        load_default=False,
        metadata={"description": "Also redact, in model output, what the redact or block detectors find."},
    )
    audit_raw_content = StrictBoolean(
        load_default=False,
        metadata={"description": "The tenant opts in to raw content in its audit records."},
    )


@dataclass(frozen=True)
class PolicyRules:
    allowed_models: frozenset[str] | None = None
    max_tokens: int | None = None
    max_input_chars: int | None = None
    system_prompt_prefix: str | None = None
    pii: dict[str, str] = field(default_factory=_all_allowed)
    redact_output: bool = False
    audit_raw_content: bool = False

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> PolicyRules:
        """From a stored document; loading it again fills fields added since it was written."""
        rules = RulesSchema().load(document)
        models = rules["allowed_models"]
        return cls(
            allowed_models=None if models is None else frozenset(models),
            max_tokens=rules["max_tokens"],
            max_input_chars=rules["max_input_chars"],
            system_prompt_prefix=rules["system_prompt_prefix"],
            pii=dict(rules["pii"]),
            redact_output=rules["redact_output"],
            audit_raw_content=rules["audit_raw_content"],
        )

    def detectors_with(self, *actions: str) -> tuple[str, ...]:
        return tuple(name for name in DETECTORS if self.pii.get(name, "allow") in actions)


@dataclass(frozen=True)
class EffectivePolicy:
    """The rules in force for a tenant and where they come from.

    `scope` is the tenant id, "default", or None with `version` None for the built-in
    permissive policy that applies when neither the tenant nor the platform has one.
    """

    scope: str | None
    version: int | None
    rules: PolicyRules


BUILTIN = EffectivePolicy(scope=None, version=None, rules=PolicyRules())
