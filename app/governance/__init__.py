"""Governance blueprint: identity, model registry, policies, audit and usage."""

from app.api import GatewayBlueprint

blp = GatewayBlueprint("governance", __name__, description="Identity, registry, policy, audit and usage.")

# Each module registers its routes on `blp` when imported.
from app.governance import audit, auth, drift, keys, policies, registry, tenants, users  # noqa: E402, F401
