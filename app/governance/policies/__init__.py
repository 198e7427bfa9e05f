"""Policies at the API boundary: allowed models, limits, PII detection with allow, redact or block."""

from app.governance.policies import models, routes  # noqa: F401  (tables for Alembic; routes on blp)
