"""Run CPU-bound model code in real OS threads so the gevent hub keeps serving.

After `patch_all()` the stdlib's threads are greenlets, which is right for I/O and useless
for CPU: a torch or llama.cpp call would stall every request of the worker and miss
gunicorn's heartbeat. gevent's hub threadpool runs real threads; llama.cpp and torch release
the GIL inside C, so the hub keeps running. Outside gevent (tests, `flask` CLI) the caller is
already a real thread and the call runs in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


def gevent_active() -> bool:
    from gevent import monkey

    return monkey.is_module_patched("threading")


def ensure_threads(count: int) -> None:
    """Give the hub's threadpool room for every model call that may run at once."""
    if gevent_active():
        import gevent

        pool = gevent.get_hub().threadpool
        pool.maxsize = max(pool.maxsize, count)


def _capture(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, Any]:
    # Exceptions travel back as values: raised inside the pool, gevent would also print
    # them to stderr as if they were crashes, and a client's 400 is not a crash.
    try:
        return True, fn(*args, **kwargs)
    except BaseException as exc:
        return False, exc


def run_in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    if gevent_active():
        import gevent

        ok, value = gevent.get_hub().threadpool.apply(_capture, (fn, args, kwargs))
        if not ok:
            raise value
        return value
    return fn(*args, **kwargs)


def _step(iterator: Iterator[T]) -> Any:
    try:
        return next(iterator)
    except StopIteration:
        return _DONE


def iterate_in_thread(iterator: Iterator[T]) -> Iterator[T]:
    """Advance a blocking generator one item per thread hop; closing this closes it promptly.

    One hop per token costs microseconds against milliseconds per token, and it means a
    client that goes away stops generation at the next token instead of at the end.
    """
    try:
        while True:
            item = run_in_thread(_step, iterator)
            if item is _DONE:
                return
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            run_in_thread(close)
