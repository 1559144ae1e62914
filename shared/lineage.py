"""Where a job's model came from and what was made from it.

A post-training job (prune, quantize, export; shared/spec.py DERIVED_SOURCES) names the
succeeded job whose checkpoint it reads in `jobs.source_job_id`, as an evaluate job
does; a prune of a prune makes a chain. The chain always ends at a train job, whose spec
describes the model (architecture, dataset, normalization) every link shares.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.orm import Job
from shared.spec import DERIVED_SOURCES, TrainSpec, load_stored_spec

# Longer chains are refused at submission; a loop cannot form (a source exists first).
MAX_CHAIN = 16


def root_train_job(session: Session, job: Job) -> Job | None:
    """The train job at the start of `job`'s chain (itself for a train job); None when
    a link is missing or the chain is longer than MAX_CHAIN."""
    current: Job | None = job
    for _ in range(MAX_CHAIN + 1):
        if current is None:
            return None
        if current.kind == "train":
            return current
        if current.kind not in DERIVED_SOURCES or current.source_job_id is None:
            return None
        current = session.get(Job, current.source_job_id)
    return None


def root_train_spec(session: Session, job: Job) -> TrainSpec | None:
    root = root_train_job(session, job)
    if root is None:
        return None
    spec = load_stored_spec(root.spec)
    return spec if isinstance(spec, TrainSpec) else None


def chain_length(session: Session, job: Job) -> int:
    """Links between `job` and its train job (0 for the train job itself)."""
    n, current = 0, job
    while current.kind != "train" and current.source_job_id is not None and n <= MAX_CHAIN:
        parent = session.get(Job, current.source_job_id)
        if parent is None:
            break
        n, current = n + 1, parent
    return n


def derived_from(session: Session, job_id: int, limit: int = 100) -> list[Job]:
    """The jobs that read `job_id`'s model: evaluations and derived models, oldest first."""
    return list(
        session.scalars(
            select(Job).where(Job.source_job_id == job_id).order_by(Job.id).limit(limit)
        )
    )
