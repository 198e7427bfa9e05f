"""Batch progress in /metrics, read from the database at each scrape.

Lines run in worker processes that may sit on other hosts than the gateway serving /metrics, and
several gateways serve the same batches, so no process's own sample files could hold the
totals: each scrape counts them where they are exact. Two gauges, for every tenant together:

- `gateway_batches{status}`: batches by status.
- `gateway_batch_requests{state}`: request lines `completed` and `failed` (recorded), and
  `pending` (not yet recorded, in batches still running or being cancelled).
"""

from __future__ import annotations

from collections.abc import Iterator

import structlog
from flask import has_app_context
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from app.extensions import db, scrape_collectors
from app.inference.batches.models import TERMINAL, Batch
from app.inference.batches.schemas import STATUSES

log = structlog.get_logger(__name__)


class BatchProgress(Collector):
    def collect(self) -> Iterator[Metric]:
        if not has_app_context():  # a registry read outside the app (nothing to count from)
            return
        totals = select(
            Batch.status,
            func.count(),
            func.coalesce(func.sum(Batch.request_total), 0),
            func.coalesce(func.sum(Batch.request_completed), 0),
            func.coalesce(func.sum(Batch.request_failed), 0),
        ).group_by(Batch.status)
        try:
            rows = db.session.execute(totals).all()
        except SQLAlchemyError as exc:  # a scrape must not fail because the database is down
            db.session.rollback()
            log.warning("batch_metrics_unavailable", error=str(exc).splitlines()[0])
            return
        batches = GaugeMetricFamily("gateway_batches", "Batch jobs by status.", labels=["status"])
        requests = GaugeMetricFamily(
            "gateway_batch_requests",
            "Batch request lines: completed, failed, pending (not yet run, in unfinished batches).",
            labels=["state"],
        )
        by_status = {status: (0, 0, 0, 0) for status in STATUSES}
        by_status.update({row[0]: tuple(int(v) for v in row[1:]) for row in rows})
        for status, (count, *_rest) in by_status.items():
            batches.add_metric([status], count)
        completed = sum(v[2] for v in by_status.values())
        failed = sum(v[3] for v in by_status.values())
        pending = sum(v[1] - v[2] - v[3] for s, v in by_status.items() if s not in TERMINAL)
        requests.add_metric(["completed"], completed)
        requests.add_metric(["failed"], failed)
        requests.add_metric(["pending"], pending)
        yield batches
        yield requests


progress = BatchProgress()
scrape_collectors.append(progress)  # the multiprocess scrape (gunicorn)
REGISTRY.register(progress)  # a single process's in-memory registry (python wsgi.py)
