"""The workers page's admin buttons (server/web/workers.py): cordon and uncordon a node,
clear a slot's crash guard; the state shows on the card, also after the page's script
redraws it from GET /api/v1/workers. Members see the state but no buttons."""

from __future__ import annotations

import redis

from shared.db import transaction, utcnow
from shared.orm import WorkerNode, WorkerSlotGuard
from shared.worker_registry import SlotInfo, register
from tests.browser.conftest import DESKTOP, Ui, log_in, make_user

NODE = "trainyard-7@gpu-07"
OFFLINE = "trainyard-9@gpu-09"
REASON = "3 jobs died within 10 s in a row: InfrastructureError: disk full: [Errno 28]"


def _register(redis_url: str) -> None:
    info = SlotInfo(name="gpu-07:70", node=NODE, host="gpu-07", pid=70, queues=("cpu",),
                    node_slots=1, slot=0)  # fmt: skip
    register(redis.Redis.from_url(redis_url), info, ttl_s=300)


def test_an_admin_cordons_uncordons_and_clears_a_node_from_the_workers_page(
    ui: Ui, browser, live_server: str, db_url: str, redis_url: str
) -> None:  # type: ignore[no-untyped-def]
    _register(redis_url)
    with transaction(db_url) as s:
        s.add(WorkerSlotGuard(node=NODE, slot=0, quick_deaths=3, last_error="disk full",
                              stopped_at=utcnow(), stopped_reason=REASON))  # fmt: skip
    make_user(db_url, "boss", "admin")
    context = browser.new_context(viewport=DESKTOP)
    errors: list[str] = []
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        log_in(page, live_server, "boss")
        page.goto(live_server + "/workers")
        card = page.locator(f'.node-card[data-node="{NODE}"]')
        assert card.locator(".slot-stopped").inner_text() == f"stopped: {REASON}"
        assert "1 slot stopped by the crash guard" in card.locator(".node-meta").inner_text()

        # Cordon: a real form POST with its CSRF token, back on the page with a message.
        card.get_by_role("button", name="Cordon").click()
        page.wait_for_url(live_server + "/workers")
        assert f"Node {NODE} cordoned" in page.locator(".flash").inner_text()
        card = page.locator(f'.node-card[data-node="{NODE}"]')
        assert "cordoned: takes no new jobs" in card.locator(".node-cordoned").inner_text()
        with transaction(db_url) as s:
            row = s.get(WorkerNode, NODE)
            assert row is not None and row.cordoned and row.changed_by == "boss"

        # The script redraws the card from the API: the state and the buttons come back.
        page.evaluate("document.querySelector('.node-card').dataset.old = '1'")
        page.locator(".node-card[data-old]").wait_for(state="detached", timeout=20_000)
        card = page.locator(f'.node-card[data-node="{NODE}"]')
        assert "cordoned: takes no new jobs" in card.locator(".node-cordoned").inner_text()
        assert card.locator(".slot-stopped").inner_text() == f"stopped: {REASON}"

        # Buttons drawn by the script post as well (their CSRF token from the page's meta).
        card.get_by_role("button", name="Uncordon").click()
        page.wait_for_url(live_server + "/workers")
        assert f"Node {NODE} uncordoned" in page.locator(".flash").inner_text()
        card = page.locator(f'.node-card[data-node="{NODE}"]')
        assert card.locator(".node-cordoned").count() == 0
        card.get_by_role("button", name="Clear crash guard").click()
        page.wait_for_url(live_server + "/workers")
        card = page.locator(f'.node-card[data-node="{NODE}"]')
        assert card.locator(".slot-stopped").count() == 0
        assert card.get_by_role("button", name="Clear crash guard").count() == 0
        with transaction(db_url) as s:
            assert s.get(WorkerNode, NODE).cordoned is False  # type: ignore[union-attr]
            assert s.get(WorkerSlotGuard, (NODE, 0)) is None

        # A node drained for maintenance and down is listed, not forgotten.
        with transaction(db_url) as s:
            s.add(WorkerNode(node=OFFLINE, cordoned=True, draining=True, drain_now=True,
                             changed_by="boss"))  # fmt: skip
        page.goto(live_server + "/workers")
        offline = page.locator(f'.offline-node[data-node="{OFFLINE}"]')
        assert "not online" in offline.inner_text()
        assert "drained: takes no new jobs, none runs" in offline.inner_text()
        offline.get_by_role("button", name="Uncordon").click()
        page.wait_for_url(live_server + "/workers")
        assert page.locator(".offline-node").count() == 0
        assert page.locator("#offline-nodes").is_hidden()
    finally:
        context.close()
    assert not errors, errors

    # A member sees the stopped slot's reason, never the buttons.
    with transaction(db_url) as s:
        s.add(WorkerSlotGuard(node=NODE, slot=0, quick_deaths=3, stopped_at=utcnow(),
                              stopped_reason=REASON))  # fmt: skip
    ui.goto("/workers")
    card = ui.page.locator(f'.node-card[data-node="{NODE}"]')  # type: ignore[attr-defined]
    assert card.locator(".slot-stopped").inner_text() == f"stopped: {REASON}"
    assert card.locator(".node-actions").count() == 0
    ui.shot("workers-node-control")
