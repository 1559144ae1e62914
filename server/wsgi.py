"""WSGI entry point for gunicorn: `gunicorn server.wsgi:app`."""

import gc

from server.app import create_app

app = create_app()
# Everything imported so far lives as long as the process: keep it out of the garbage
# collector's full passes, which otherwise add 60-90 ms to a random request.
gc.freeze()
