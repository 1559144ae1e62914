"""LeaseKeeper: a heartbeat thread that extends the job's lease and watches for cancel.

It sets `stop` when the user asked to cancel, or when this attempt lost the job
(another worker reclaimed it after the lease expired), so the training loop, which
only checks a threading.Event between steps, stops within a step or two.
"""

from __future__ import annotations

import logging
import threading

from shared.db import transaction
from shared.state_machine import heartbeat

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self, database_url: str, job_id: int, attempt: int, lease_seconds: float, interval: float
    ):
        self._url = database_url
        self._job_id = job_id
        self._attempt = attempt
        self._lease_seconds = lease_seconds
        self._interval = interval
        self.stop = threading.Event()
        self.cancel_requested = False
        self.lost = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def beat(self) -> None:
        with transaction(self._url) as session:
            hb = heartbeat(session, self._job_id, self._attempt, self._lease_seconds)
        if not hb.owned:
            self.lost = True
            self.stop.set()
        elif hb.cancel_requested:
            self.cancel_requested = True
            self.stop.set()

    def _run(self) -> None:
        while not self._done.wait(self._interval):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a missed beat is survivable; the lease has slack
                log.warning("job %s: heartbeat failed", self._job_id, exc_info=True)
            if self.lost:
                log.warning("job %s attempt %s: lease lost; stopping", self._job_id, self._attempt)
                return

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
