"""Batch jobs, as OpenAI's Batch API: files in, a distributed queue of lines, files out.

- files.py      /v1/files: upload (multipart, purpose=batch), list, get, content, delete
- batches.py    /v1/batches: create (the input file checked line by line), get, list, cancel
- lines.py      what a valid input line is
- queue.py      Celery on Redis: one message per line; which workers are alive
- execution.py  one line through the governed service path, recorded exactly once; finalising
- worker.py     the worker process (`make worker`), and why Celery rather than RQ
- metrics.py    progress in /metrics

Routes are on the inference blueprint; everything is stored in the database (models.py).
"""

from __future__ import annotations

from flask import Flask

from app.inference.batches import batches, files, metrics, models, queue  # noqa: F401  (routes, tables)


def init_app(app: Flask) -> None:
    queue.init_app(app)
