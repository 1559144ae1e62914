"""The workers page flags a node alive but not consuming and lists a lost node with its
last job's fate (shared/fleet_health.py), as rendered and after the page's script
redraws it from GET /api/v1/workers. The real workers behind it: tests/test_fleet_health.py
and tests/faults/test_lost_worker.py."""

from __future__ import annotations

from datetime import timedelta

import redis
from sqlalchemy import select

from shared.db import transaction, utcnow
from shared.orm import JobEvent, User
from shared.worker_registry import Activity, SlotInfo, register, slot_key
from tests.browser.conftest import Ui
from tests.job_rows import add_jobs

STUCK = "trainyard-5@cpu-05"
LOST = "trainyard-8@cpu-08"


def _seed(db_url: str, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    stuck = SlotInfo(name="cpu-05:50", node=STUCK, host="cpu-05", pid=50, queues=("cpu",),
                     node_slots=1, slot=0)  # fmt: skip
    register(client, stuck, ttl_s=300, activity=Activity(600.0, 600.0, 0.0))
    client.lpush("cpu", "a message nobody takes")
    lost = SlotInfo(name="cpu-08:80", node=LOST, host="cpu-08", pid=80, queues=("cpu",),
                    node_slots=1, slot=0)  # fmt: skip
    register(client, lost, ttl_s=300)
    client.delete(slot_key(lost.name))  # its entry expired: the host is gone
    with transaction(db_url) as s:
        owner = s.scalar(select(User.id).where(User.username == "ada"))
    ago = utcnow() - timedelta(minutes=10)
    waiting, failed = add_jobs(db_url, [
        {"owner": owner, "name": "waits", "state": "queued", "created_at": ago},
        {"owner": owner, "name": "was-there", "state": "failed", "error_message": "boom"},
    ])  # fmt: skip
    with transaction(db_url) as s:
        s.add(JobEvent(job_id=failed, at=utcnow(), kind="claimed", attempt=1, worker="cpu-08:80"))


def test_the_workers_page_shows_a_stuck_node_and_a_lost_one(
    ui: Ui, db_url: str, redis_url: str
) -> None:
    _seed(db_url, redis_url)
    ui.goto("/workers")
    page = ui.page

    def check() -> None:
        card = page.locator(f'.node-card[data-node="{STUCK}"]')  # type: ignore[attr-defined]
        flag = card.locator(".node-not-consuming").inner_text()
        assert flag.startswith("not consuming: 1 job it could take has waited 10 min"), flag
        lost = page.locator(f'.lost-node[data-node="{LOST}"]')  # type: ignore[attr-defined]
        assert lost.locator(".lost-state").inner_text() == "lost"
        assert lost.locator(".lost-fate").inner_text() == "failed: boom"
        assert lost.locator(".job-link").inner_text() == "was-there"

    check()
    # The script redraws both from the API.
    page.evaluate("document.querySelector('.lost-node').dataset.old = '1'")  # type: ignore[attr-defined]
    page.locator(".lost-node[data-old]").wait_for(state="detached", timeout=20_000)  # type: ignore[attr-defined]
    check()
    ui.shot("workers-stuck-and-lost")
