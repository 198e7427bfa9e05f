"""An existing Flask app, the way a team already has one: its own blueprint, its own login, its
own error pages. Mounting the gateway is the three lines marked below."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from flask import Blueprint, Flask, redirect, render_template, request, session, url_for
from werkzeug.security import check_password_hash, generate_password_hash

from app import FlaskAIGateway  # (1) the extension

bp = Blueprint("shop", __name__)
ORDERS = {"alice": ["#1001 teapot", "#1002 two mugs"]}


def login_required(view: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if "user" not in session:
            return redirect(url_for("shop.login", next=request.path))
        return view(*args, **kwargs)

    return wrapped


@bp.get("/")
def index() -> str:
    return render_template("index.html", user=session.get("user"))


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    error = None
    if request.method == "POST":
        users: Mapping[str, str] = bp_users()
        name, password = request.form.get("username", ""), request.form.get("password", "")
        if name in users and check_password_hash(users[name], password):
            session["user"] = name
            return redirect(request.args.get("next") or url_for("shop.orders"))
        error = "Wrong username or password."
    return render_template("login.html", error=error)


@bp.get("/orders")
@login_required
def orders() -> str:
    return render_template("orders.html", user=session["user"], orders=ORDERS.get(session["user"], []))


def bp_users() -> Mapping[str, str]:
    from flask import current_app

    return current_app.config["SHOP_USERS"]


def create_app(gateway_config: Mapping[str, object] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="shop-secret-key-for-the-example-only",
        SHOP_USERS={"alice": generate_password_hash("wonderland")},
    )
    app.register_blueprint(bp)

    @app.errorhandler(404)
    def not_found(error: Exception) -> tuple[str, int]:
        return render_template("404.html"), 404

    FlaskAIGateway(app, url_prefix="/ai", config=gateway_config)  # (2) mount it under /ai
    return app  # (3) that's all: /ai/v1/chat/completions, /ai/docs, ... are served
