"""What `trainyard serve` runs: gunicorn loads `worker.serving.wsgi:app` in its one
worker process (server/cli/serve_command.py)."""

from __future__ import annotations

import torch

from shared.log_setup import configure_logging
from shared.settings import load_settings
from worker.serving.app import create_app

_settings = load_settings()
configure_logging(_settings.log_format, "serve")
if _settings.torch_threads:
    torch.set_num_threads(_settings.torch_threads)
app = create_app(_settings)
