"""Dynamic micro-batching for one loaded model version.

Requests hand their prepared rows to `submit` and wait. One thread per version takes
the waiting requests in arrival order: it starts a forward pass once
TRAINYARD_SERVE_MAX_BATCH rows wait, or TRAINYARD_SERVE_MAX_WAIT_MS after the oldest
waiting request arrived, whichever comes first; the pass takes whole requests up to
max_batch rows (a request larger than that runs alone), and each request gets its own
rows of the output back. While a pass runs, new requests gather for the next one, so
under load batches fill without waiting at all.

At most TRAINYARD_SERVE_QUEUE_LIMIT requests wait per version; the next one is refused
at once (QueueFull: 503 with Retry-After), so memory and latency stay bounded however
many clients send. With batching off (TRAINYARD_SERVE_BATCHING=false, the benchmark's
baseline) each request runs its own forward pass in its own thread, the same limit
counting requests in flight.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The version's queue holds queue_limit requests already."""


class BatcherClosed(Exception):
    """The version left the cache while the request waited to be queued."""


@dataclass
class _Item:
    x: torch.Tensor
    arrived: float
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    error: BaseException | None = None


class Batcher:
    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        *,
        max_batch: int,
        max_wait_s: float,
        queue_limit: int,
        enabled: bool = True,
        on_batch: Callable[[int], None] = lambda _rows: None,
        name: str = "model",
    ) -> None:
        self.forward, self.on_batch = forward, on_batch
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.queue_limit, self.enabled = queue_limit, enabled
        self._cond = threading.Condition()
        self._pending: collections.deque[_Item] = collections.deque()
        self._rows = 0
        self._in_flight = 0
        self._closed = False
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._run, name=f"batcher-{name}", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------ requests

    def submit(self, x: torch.Tensor, timeout_s: float = 60.0) -> torch.Tensor:
        """The model's output for the rows `x` (N, ...). Raises QueueFull, BatcherClosed,
        TimeoutError, or what the forward pass raised."""
        if not self.enabled:
            return self._direct(x)
        item = _Item(x, time.monotonic())
        with self._cond:
            if self._closed:
                raise BatcherClosed()
            if len(self._pending) >= self.queue_limit:
                raise QueueFull()
            self._pending.append(item)
            self._rows += x.shape[0]
            self._cond.notify()
        if not item.done.wait(timeout_s):
            raise TimeoutError(f"no forward pass within {timeout_s:g} s")
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def _direct(self, x: torch.Tensor) -> torch.Tensor:
        with self._cond:
            if self._in_flight >= self.queue_limit:
                raise QueueFull()
            self._in_flight += 1
        try:
            with torch.inference_mode():
                out = self.forward(x)
            self.on_batch(x.shape[0])
            return out
        finally:
            with self._cond:
                self._in_flight -= 1

    def waiting(self) -> int:
        with self._cond:
            return len(self._pending) if self.enabled else self._in_flight

    def close(self) -> None:
        """Stop the thread once the requests already queued are answered."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ------------------------------------------------------------ the thread

    def _take(self) -> list[_Item] | None:
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = self._pending[0].arrived + self.max_wait_s
            while self._rows < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            taken = [self._pending.popleft()]
            rows = taken[0].x.shape[0]
            while self._pending and rows + self._pending[0].x.shape[0] <= self.max_batch:
                item = self._pending.popleft()
                rows += item.x.shape[0]
                taken.append(item)
            self._rows -= rows
            return taken

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            try:
                x = taken[0].x if len(taken) == 1 else torch.cat([i.x for i in taken])
                with torch.inference_mode():
                    out = self.forward(x)
                self.on_batch(x.shape[0])
                start = 0
                for item in taken:
                    n = item.x.shape[0]
                    item.result = out[start : start + n]
                    start += n
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                log.exception("forward pass of %d requests failed", len(taken))
                for item in taken:
                    item.error = exc
            finally:
                for item in taken:
                    item.done.set()
