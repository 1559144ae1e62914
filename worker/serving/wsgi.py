"""What `trainyard serve` runs: gunicorn loads `worker.serving.wsgi:app` in its one
worker process (server/cli/serve_command.py)."""

from __future__ import annotations

import logging

import torch

from shared.settings import load_settings
from worker.serving.app import create_app

logging.basicConfig(level=logging.INFO, format="%(asctime)s [serve] %(levelname)s %(message)s")
_settings = load_settings()
if _settings.torch_threads:
    torch.set_num_threads(_settings.torch_threads)
app = create_app(_settings)
