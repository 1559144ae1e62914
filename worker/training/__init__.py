"""PyTorch training and evaluation for Trainyard jobs.

Plain functions over a spec, a device and a sink; nothing here knows about Celery,
Flask or the database. The runner in worker/ maps JobCancelled to `cancelled` and
UserError to `failed`.
"""

from worker.training.datasets import DataPaths
from worker.training.device import pick_device
from worker.training.errors import JobCancelled, UserError
from worker.training.evaluation import evaluate_job
from worker.training.sink import ListSink, Sink
from worker.training.train import train_job

__all__ = [
    "DataPaths",
    "JobCancelled",
    "ListSink",
    "Sink",
    "UserError",
    "evaluate_job",
    "pick_device",
    "train_job",
]
