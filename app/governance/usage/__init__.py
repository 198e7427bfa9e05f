"""Usage reports: requests, tokens, errors and latency per tenant, model and day.

`rollup.py` keeps the per-day totals, which the audit writer updates in the same transaction as
the records they count; `routes.py` serves the report from them, so reading usage costs the same
whatever the size of the audit trail.
"""

from app.governance.usage import routes  # noqa: F401  (registers the route)
