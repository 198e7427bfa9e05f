"""Real-browser helpers: Debian's chromium driven by Playwright (`executable_path`, no browser
download), and pages that may reach only our own server, so "works offline" is what is tested."""

from __future__ import annotations

import os
import shutil
from typing import Any
from urllib.parse import urlsplit

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"


def offline_page(browser: Any, origin: str) -> tuple[Any, Any, list[str], list[str], list[str]]:
    """A fresh context and page. Any request off `origin` (data: and blob: URLs aside) is aborted
    and remembered in `refused`; every script URL is in `scripts`; page errors and console
    errors are in `errors`."""
    context = browser.new_context()
    page = context.new_page()
    refused: list[str] = []
    scripts: list[str] = []
    ours = urlsplit(origin).netloc

    def route(r: Any) -> None:
        url = r.request.url
        if r.request.resource_type == "script":
            scripts.append(url)
        if urlsplit(url).netloc == ours or url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            refused.append(url)
            r.abort()

    page.route("**/*", route)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    return context, page, refused, scripts, errors
