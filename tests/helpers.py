"""Spec builders shared by tests."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench_module(name: str) -> Any:
    """bench/<name>.py as a module (bench/ is a directory of scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses look their module up in sys.modules, and
    # run_all's `import benchlib` finds it there.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def train_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "kind": "train",
        "name": "digits-cnn",
        "tags": ["test"],
        "dataset": {"name": "digits"},
        # Defaults from the registry except dropout; reaches val accuracy ~0.95 in 3 epochs.
        "model": {"name": "cnn", "params": {"dropout": 0.25}},
        "optimizer": {"name": "adam", "lr": 0.003},
        "epochs": 3,
        "batch_size": 16,
        "seed": 0,
    }
    spec.update(copy.deepcopy(overrides))
    return spec


def evaluate_spec(source_job_id: int, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "kind": "evaluate",
        "source_job_id": source_job_id,
        "dataset": {"split": "test"},
    }
    spec.update(overrides)
    return spec


def without_csrf_token(page: str) -> str:
    """`page` with its CSRF tokens blanked. A token carries a timestamp, so two pages
    rendered either side of a second boundary differ there and nowhere else."""
    return re.sub(r'(name="csrf[-_]token" (?:content|value)=)"[^"]*"', r'\1"-"', page)


def job_events(url: str, job_id: int) -> list[tuple[str, str | None]]:
    """A job's timeline as (kind, message) pairs, oldest first."""
    from sqlalchemy import select

    from shared.db import transaction
    from shared.orm import JobEvent

    with transaction(url) as s:
        rows = s.execute(
            select(JobEvent.kind, JobEvent.message)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        ).all()
    return [(r.kind, r.message) for r in rows]
