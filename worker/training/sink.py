"""Where the training loop reports metric points and progress.

The loop only knows this protocol; the runner supplies a sink that buffers points and
writes them to the database in batches, tests and benches use ListSink.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable


@runtime_checkable
class Sink(Protocol):
    def log(self, key: str, value: float, step: int, epoch: int | None = None) -> None:
        """Record one metric point. Called a few times per epoch: must not block long."""
        ...

    def progress(self, progress: dict[str, Any]) -> None:
        """Replace the job's live progress (epoch, step, speed, ETA). At most ~1 call/s."""
        ...


class LoggedPoint(NamedTuple):
    key: str
    value: float
    step: int
    epoch: int | None


class ListSink:
    """Keeps everything in memory, for tests and benchmarks."""

    def __init__(self) -> None:
        self.points: list[LoggedPoint] = []
        self.progress_updates: list[dict[str, Any]] = []

    def log(self, key: str, value: float, step: int, epoch: int | None = None) -> None:
        self.points.append(LoggedPoint(key, value, step, epoch))

    def progress(self, progress: dict[str, Any]) -> None:
        self.progress_updates.append(dict(progress))

    def series(self, key: str) -> list[float]:
        return [p.value for p in self.points if p.key == key]


class NullSink:
    """Drops everything: the sink of a data-parallel job's ranks other than rank 0,
    which alone reports."""

    def log(self, key: str, value: float, step: int, epoch: int | None = None) -> None:
        pass

    def progress(self, progress: dict[str, Any]) -> None:
        pass
