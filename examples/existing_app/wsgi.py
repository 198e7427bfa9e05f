"""`gunicorn -c ../../gunicorn.conf.py wsgi:app` from this folder, or `flask --app wsgi run`."""

from shop import create_app

app = create_app()
