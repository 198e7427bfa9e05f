"""The scopes a credential can carry. `admin` is the platform operator: every scope, every tenant.

Only the platform tenant's credentials may hold it (`accounts.check_admin_grant`), and
`Principal` drops it anywhere else, so the functions here may treat it as the wildcard.
"""

from __future__ import annotations

from collections.abc import Iterable

INFERENCE_INVOKE = "inference:invoke"
MODELS_READ = "models:read"
GOVERNANCE_READ = "governance:read"
GOVERNANCE_WRITE = "governance:write"
ADMIN = "admin"

SCOPES: tuple[str, ...] = (INFERENCE_INVOKE, MODELS_READ, GOVERNANCE_READ, GOVERNANCE_WRITE, ADMIN)
DESCRIPTIONS: dict[str, str] = {
    INFERENCE_INVOKE: "Call models: chat, embeddings, Open Inference Protocol, fan-out.",
    MODELS_READ: "List models and read their metadata.",
    GOVERNANCE_READ: "Read the tenant's keys, users, policies, audit trail, usage and drift.",
    GOVERNANCE_WRITE: "Change the tenant's keys, users and policies.",
    ADMIN: "Platform operator (platform tenant only): every scope, every tenant, the model registry.",
}
DEFAULT_KEY_SCOPES: tuple[str, ...] = (INFERENCE_INVOKE, MODELS_READ)


def unknown(scopes: Iterable[str]) -> list[str]:
    return sorted(set(scopes) - set(SCOPES))


def satisfies(granted: frozenset[str], required: Iterable[str]) -> bool:
    return ADMIN in granted or set(required) <= granted


def grantable(granter: frozenset[str], requested: Iterable[str]) -> bool:
    """A non-admin may hand out only scopes it holds itself, so no one escalates by minting a key."""
    return ADMIN in granter or set(requested) <= granter


def join(scopes: Iterable[str]) -> str:
    """Canonical stored/wire form: sorted, space-separated (RFC 6749 section 3.3)."""
    return " ".join(sorted(set(scopes)))
