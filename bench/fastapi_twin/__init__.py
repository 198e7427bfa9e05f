"""The FastAPI twin: our chat-completions path written the way the FastAPI articles recommend.

A benchmark peer only, never imported by ``app/``. Run it with
``uvicorn bench.fastapi_twin.app:app --workers 1 --loop uvloop --http httptools``; its settings come
from ``TWIN_*`` environment variables (see ``bench.fastapi_twin.app.Settings``).
"""
