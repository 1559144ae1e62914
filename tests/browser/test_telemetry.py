"""Telemetry in the browser: a job page charts its system metrics (CPU, resident memory)
beside the loss, and the workers page shows a host's card with its CPU and memory and
one bar per GPU, the same after the page's script redraws it from the API."""

from __future__ import annotations

import time

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import get_engine
from shared.orm import User
from shared.worker_registry import SlotInfo, register
from tests.browser.conftest import Ui
from tests.job_rows import add_jobs

GB = 10**9


def _owner(db_url: str, username: str) -> int:
    with Session(get_engine(db_url)) as s:
        return s.scalar(select(User.id).where(User.username == username))  # type: ignore[return-value]


def test_the_job_page_charts_system_metrics_beside_the_loss(ui: Ui, db_url: str) -> None:
    [job_id] = add_jobs(
        db_url,
        [
            {
                "owner": _owner(db_url, ui.username),
                "name": "watched",
                "points": {
                    "train_loss": [1.2, 0.8, 0.5],
                    "val_loss": [1.3, 0.9, 0.6],
                    "cpu_percent": [88.0, 97.5, 99.0],
                    "rss_gb": [0.41, 0.52, 0.53],
                },
            }
        ],
    )
    ui.goto(f"/jobs/{job_id}")
    page = ui.page
    cpu = page.locator("#chart-cpu .chart")  # type: ignore[attr-defined]
    cpu.wait_for()
    page.locator("#chart-loss .chart").wait_for()  # type: ignore[attr-defined]
    label = cpu.get_attribute("aria-label") or ""
    # The x axis is running time, the legend names the unit.
    assert "CPU 99 at 3.0 s into the run" in label, label
    assert "over running time" in page.locator("#chart-cpu figcaption").inner_text()  # type: ignore[attr-defined]
    assert page.locator("#chart-cpu .u-legend", has_text="CPU (%)").count() == 1  # type: ignore[attr-defined]
    rss = page.locator("#chart-rss .chart").get_attribute("aria-label") or ""  # type: ignore[attr-defined]
    assert "resident memory 0.53 at 3.0 s into the run" in rss, rss
    # A CPU-only job: no GPU charts.
    assert page.locator("#chart-gpu-util").count() == 0  # type: ignore[attr-defined]
    ui.shot("job-system-metrics")


def test_the_workers_page_shows_the_host_card_with_gpu_bars(ui: Ui, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    gpu = {"index": 0, "uuid": "GPU-aaa", "name": "NVIDIA H200", "util_percent": 87.0,
           "mem_used_bytes": 70 * GB, "mem_total_bytes": 141 * GB, "temp_c": 64.0,
           "power_w": 451.5}  # fmt: skip
    sample = {
        "host": {
            "cpu_percent": 37.0,
            "cpus": 16,
            "mem_used_bytes": 21 * GB,
            "mem_total_bytes": 64 * GB,
        },  # fmt: skip
        "slot": {"cpu_percent": 101.0, "rss_bytes": int(1.5 * GB)},
        "gpus": [gpu, {**gpu, "index": 1, "uuid": "GPU-bbb", "util_percent": 3.0}],
        "at": time.time(),
    }
    info = SlotInfo(name="gpu-01:11", node="trainyard@gpu-01", host="gpu-01", pid=11,
                    queues=("gpu",), node_slots=1, gpu_names=("NVIDIA H200",) * 2,
                    device="cuda:0")  # fmt: skip
    register(client, info, ttl_s=120, telemetry=sample)
    cpu_info = SlotInfo(name="cpu-01:12", node="trainyard@cpu-01", host="cpu-01", pid=12,
                        queues=("cpu",), node_slots=1)  # fmt: skip
    register(client, cpu_info, ttl_s=120, telemetry={**sample, "gpus": []})

    ui.goto("/workers")
    page = ui.page
    card = page.locator('.node-card[data-node="trainyard@gpu-01"]')  # type: ignore[attr-defined]
    card.wait_for()
    assert card.locator(".gpu-bar").count() == 2
    assert card.locator('.gpu-bar[data-gpu="0"] meter').get_attribute("value") == "87.0"
    assert "memory 70.0 / 141.0 GB · 64 °C · 452 W" in card.locator(".gpu-bar").first.inner_text()
    assert "CPU 37% of 16 cores · memory 21.0 / 64.0 GB" in card.locator(".host-stats").inner_text()
    assert card.locator(".slot-cpu").inner_text() == "101%"
    assert card.locator(".slot-rss").inner_text() == "1.5 GB"
    cpu_card = page.locator('.node-card[data-node="trainyard@cpu-01"]')  # type: ignore[attr-defined]
    assert cpu_card.locator(".gpu-bar").count() == 0  # no GPUs: no bars, no error
    assert "CPU 37%" in cpu_card.locator(".host-stats").inner_text()

    # The script redraws the cards from GET /api/v1/workers: the same text comes back.
    def text() -> list[str]:
        parts = ".host-stats, .gpu-label, .gpu-util, .gpu-detail"
        meters = card.locator("meter")
        values = [float(meters.nth(i).get_attribute("value")) for i in range(meters.count())]
        return card.locator(parts).all_inner_texts() + values  # type: ignore[no-any-return]

    before = text()
    page.evaluate("document.querySelector('.node-card').dataset.old = '1'")  # type: ignore[attr-defined]
    page.locator(".node-card[data-old]").wait_for(state="detached", timeout=20_000)  # type: ignore[attr-defined]
    assert text() == before
    assert card.locator(".slot-cpu").inner_text() == "101%"
    assert card.locator(".slot-rss").inner_text() == "1.5 GB"
    ui.shot("workers-telemetry")
