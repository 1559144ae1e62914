"""The states a job can be in. Only names here: shared/state_machine.py is what moves a
job between them. Kept free of SQLAlchemy so the CLI can use it."""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


ALL_STATES = tuple(s.value for s in JobState)
# A finished job never changes state again. As strings: the API, the pages and the CLI
# compare the `state` column and JSON values, which are plain strings.
FINISHED_STATES = frozenset(
    {JobState.SUCCEEDED.value, JobState.FAILED.value, JobState.CANCELLED.value}
)


def is_finished(state: str) -> bool:
    return state in FINISHED_STATES
