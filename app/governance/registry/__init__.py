"""Model registry: versions, aliases, canary traffic, rollback, propagation to every worker."""

from app.governance.registry import models, routes  # noqa: F401  (tables and routes)
