"""The gateway plus two bare routes, for measuring what authentication and rate limiting cost.

``POST /bench/open`` does nothing; ``POST /bench/guarded`` does nothing behind the gateway's own
``require_scopes`` (API-key check, scope check, tenant and key rate limits on Redis). The
difference between them is the cost of the request path's first two steps. Registered only here
(``gunicorn -c gunicorn.conf.py bench.auth_app:app``), never by ``app.create_app``.
"""

from __future__ import annotations

from flask import Blueprint

from app import create_app
from app.identity.principal import require_scopes

blueprint = Blueprint("bench_auth", __name__)


@blueprint.route("/bench/open", methods=["POST"])
def open_route() -> dict[str, bool]:
    return {"ok": True}


@blueprint.route("/bench/guarded", methods=["POST"])
@require_scopes("inference:invoke")
def guarded_route() -> dict[str, bool]:
    return {"ok": True}


app = create_app()
app.register_blueprint(blueprint)
