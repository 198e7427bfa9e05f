"""WSGI entry point: `gunicorn -c gunicorn.conf.py` loads `wsgi:app`.

Run directly (`python wsgi.py`) it serves with gevent's own server, patching first, as the
gunicorn gevent worker does before it imports the app.
"""

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import os
import sys

from app import create_app
from config import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    sys.exit(f"configuration error: {exc}")

if __name__ == "__main__":
    from gevent.pywsgi import WSGIServer

    from app import heap

    heap.manage()
    app.extensions["models"].start_loading()
    host, _, port = os.environ.get("BIND", "127.0.0.1:8000").rpartition(":")
    WSGIServer((host, int(port)), app).serve_forever()
