"""The per-job log: what happened to a job, in words, for the people who submitted it.

One file per job (shared/job_files.py: `log_path`), appended to by every attempt:

    2026-11-28T15:04:05.123Z [attempt 1] claimed by host:4242 on cpu
    2026-11-28T15:04:06.456Z [attempt 1] epoch 1/5: train_loss=0.8123 val_loss=0.4021 ...

The runner writes events through `JobLog.event`; while a JobLog is open, whatever the
training code logs at INFO or above (`worker.training.*` loggers) lands there too, and
`EpochLogSink` turns each epoch's metric points into one line. The web tails the file
live, so every line is flushed as it is written. The log is a convenience: failing to
write it is reported once in the worker's own log and never fails the job.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from shared.metric_catalog import per_epoch_keys
from shared.redaction import DETAIL_MARK
from worker.training.sink import Sink

log = logging.getLogger(__name__)

TRAINING_LOGGER = "worker.training"
# Points logged once per epoch (the catalogue's per-epoch series) make the epoch lines;
# per-step points (step_loss) would flood the log.
EPOCH_KEYS = per_epoch_keys()


def timestamp() -> str:
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    return now.isoformat(timespec="milliseconds") + "Z"


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def format_metrics(metrics: dict[str, Any]) -> str:
    """`key=value` pairs of the scalar entries; lists (a confusion matrix) are left out."""
    return " ".join(
        f"{key}={format_value(value)}"
        for key, value in metrics.items()
        if isinstance(value, (int, float, str, bool))
    )


class JobLog:
    """Appends events for one attempt of one job; a context manager that also collects
    the training code's log records while it is open."""

    def __init__(self, path: Path, job_id: int, attempt: int):
        self.path = Path(path)
        self.job_id = job_id
        self.attempt = attempt
        self._file: Any = None
        self._broken = False
        self._lock = threading.Lock()
        self._handler: _TrainingLogHandler | None = None

    def event(self, message: str) -> None:
        """Write one event; every line of a multi-line message (a traceback) gets the
        prefix, so a tail of the file always says when and which attempt."""
        prefix = f"{timestamp()} [attempt {self.attempt}] "
        text = "".join(f"{prefix}{line}\n" for line in message.rstrip("\n").split("\n"))
        # One unbuffered write per event with O_APPEND: a line from this attempt and one
        # from a zombie earlier attempt still writing the same file never interleave.
        data = text.encode("utf-8", errors="replace")
        with self._lock:
            if self._broken:
                return
            try:
                if self._file is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
                self._file.write(data)
            except (OSError, ValueError) as exc:
                self._broken = True
                log.warning(
                    "job %s attempt %s: cannot write the job log %s (%s); going on without it",
                    self.job_id, self.attempt, self.path, exc,
                )  # fmt: skip

    def detail(self, text: str) -> None:
        """Write `text` (a traceback) as detail lines: the log keeps them, and only
        admins are shown them (shared/redaction.py)."""
        self.event("\n".join(DETAIL_MARK + line for line in text.rstrip("\n").split("\n")))

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None

    def __enter__(self) -> JobLog:
        self._handler = _TrainingLogHandler(self, threading.get_ident())
        logging.getLogger(TRAINING_LOGGER).addHandler(self._handler)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handler is not None:
            logging.getLogger(TRAINING_LOGGER).removeHandler(self._handler)
            self._handler = None
        if exc is not None:
            self.event(f"worker error: {type(exc).__name__}: {exc}")
        self.close()


class _TrainingLogHandler(logging.Handler):
    """Copies the training code's records into the job log. Only the job's own thread:
    another job running in this process (thread pools, tests) must not leak in."""

    def __init__(self, job_log: JobLog, thread: int):
        super().__init__(level=logging.INFO)
        self._job_log = job_log
        self._thread = thread
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self._thread:
            return
        # The message is an event; an exception's traceback goes in as detail lines.
        exc_info, exc_text = record.exc_info, record.exc_text
        record.exc_info = record.exc_text = None
        try:
            message = self.format(record)
        except Exception:  # noqa: BLE001 - a bad format string must not reach the job
            self.handleError(record)
            return
        finally:
            record.exc_info, record.exc_text = exc_info, exc_text
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname.lower()}: {message}"
        self._job_log.event(message)
        if exc_info and exc_info[1] is not None:
            self._job_log.detail("".join(traceback.format_exception(exc_info[1])))


class EpochLogSink:
    """A Sink that passes everything on to `inner` and writes one job-log line per
    finished epoch with that epoch's metrics.

    The training loop logs an epoch's metrics and then reports progress
    (worker/training/train.py), so the line is written at that progress report, when
    a point for a later epoch arrives, or at `flush`, whichever comes first.
    """

    def __init__(self, inner: Sink, job_log: JobLog):
        self._inner = inner
        self._job_log = job_log
        self._epoch: int | None = None
        self._metrics: dict[str, float] = {}
        self._epochs: int | None = None

    def log(self, key: str, value: float, step: int, epoch: int | None = None) -> None:
        self._inner.log(key, value, step, epoch)
        if key not in EPOCH_KEYS:
            return
        if epoch != self._epoch:
            self.flush()
            self._epoch = epoch
        self._metrics[key] = value

    def progress(self, progress: dict[str, Any]) -> None:
        self._inner.progress(progress)
        self._epochs = progress.get("epochs", self._epochs)
        self.flush()

    def flush(self) -> None:
        if not self._metrics:
            return
        total = f"/{self._epochs}" if self._epochs else ""
        self._job_log.event(f"epoch {self._epoch}{total}: {format_metrics(self._metrics)}")
        self._metrics = {}
