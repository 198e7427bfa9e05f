"""What only a worker can say about itself: how many greenlets it holds, sampled now and then.

RSS and open descriptors are read from outside (psutil, /proc); the number of live greenlets is
not, and a slow greenlet leak (a fan-out task or a stream greenlet nobody joins) is exactly what a
soak looks for. Counting them means walking the garbage collector's objects, which takes tens of
milliseconds with torch loaded and blocks the hub meanwhile, so sampling is off unless
WORKER_STATS_INTERVAL (seconds) is set, as bench/soak.py sets it.
"""

from __future__ import annotations

import gc
import os

from prometheus_client import Gauge

GREENLETS = Gauge(
    "gateway_worker_greenlets",
    "Live greenlets in each worker (sampled every WORKER_STATS_INTERVAL seconds; absent when off).",
    multiprocess_mode="liveall",
)


def live_greenlets() -> int:
    from greenlet import greenlet

    return sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet) and not obj.dead)


def start_sampling() -> None:
    """From gunicorn's post_worker_init: a greenlet that refreshes the gauge, if asked for."""
    interval = float(os.environ.get("WORKER_STATS_INTERVAL") or 0)
    if interval <= 0:
        return
    import gevent

    def sample() -> None:
        while True:
            GREENLETS.set(live_greenlets())
            gevent.sleep(interval)

    gevent.spawn(sample)
