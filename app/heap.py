"""A serving worker's heap and CPython's cyclic garbage collector.

A worker holds about a million objects that live as long as it does: Flask, SQLAlchemy, torch,
transformers and the loaded models. CPython's oldest-generation collection walks every one of
them. Under gunicorn that took 95-125 ms per full collection, once every 5 to 8 s at 200 req/s:
a stall of the whole gevent hub in which no greenlet runs, and the bulk of the gateway's chat p99
(226 ms against a p50 of 54 ms; 61 ms once frozen, issue 9).

`gc.freeze()` moves everything alive at that moment into a permanent generation that collections
skip, which is what the CPython documentation advises for a long-running server after start-up.
A frozen object that later becomes cyclic garbage is never freed, so this runs only where the
heap has settled: once the worker has imported the app, and again after models load. Only server
entry points turn it on (`manage`); tests, the CLI and an app embedded in someone else's process
keep CPython's default behaviour.
"""

import gc

_managed = False


def manage() -> None:
    """Called by a serving process once its app is imported: freeze now and after each model load."""
    global _managed
    _managed = True
    settle()


def settle() -> None:
    """Collect what is garbage now, then freeze what is left (a no-op unless `manage` was called)."""
    if _managed:
        gc.collect()
        gc.freeze()
