"""WSGI entry point for gunicorn: `gunicorn server.wsgi:app`."""

import gc

from server.app import create_app
from shared.log_setup import configure_logging
from shared.settings import load_settings

_settings = load_settings()
configure_logging(_settings.log_format, "web")
app = create_app(_settings)
# Everything imported so far lives as long as the process: keep it out of the garbage
# collector's full passes, which otherwise add 60-90 ms to a random request.
gc.freeze()
