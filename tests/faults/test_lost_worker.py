"""A lost worker (README "Draining and cordoning workers"; shared/fleet_health.py): a node
SIGKILLed mid-job, whose registry entries then expire, is listed as "lost" with the job
it ran and what became of it (the reconciler requeued it, another worker resumed it)."""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import pytest

from shared.worker_registry import TTL_S
from tests.faults.conftest import Cluster, long_spec, wait_for


def _lost(cluster: Cluster, node: str) -> dict[str, Any] | None:
    body = cluster.http.get(f"{cluster.url}/api/v1/workers", timeout=30).json()
    if any(n["node"] == node for n in body["nodes"]):
        return None
    return next((n for n in body["lost_nodes"] if n["node"] == node), None)


# Once, on SQLite: tests/test_fleet_health.py runs the stuck consumer on PostgreSQL.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_sigkilled_worker_shows_as_lost_with_its_job_resumed_elsewhere(cluster: Cluster) -> None:
    victim = cluster.start_worker()
    node = victim.name.replace("%h", socket.gethostname())
    cluster.start_reconciler()
    job_id = cluster.submit(long_spec(epochs=30))
    wait_for(
        lambda: cluster.job(job_id).state == "running" and cluster.checkpoint(job_id, 1).is_file(),
        90,
        "attempt 1 to write its first checkpoint",
    )
    slot = cluster.job(job_id).worker
    os.killpg(victim.proc.pid, signal.SIGKILL)  # the host is gone: no goodbye
    rescuer = cluster.start_worker()

    job = cluster.wait_state(job_id, {"succeeded"}, timeout=180)
    assert job.attempt == 2 and job.worker != slot
    lost = wait_for(lambda: _lost(cluster, node), TTL_S + 30, "the node to show as lost")
    assert lost["state"] == "lost" and lost["stopped_at"] is None, lost
    assert slot in lost["slots"], lost
    [shown] = lost["jobs"]
    assert (shown["id"], shown["attempt"], shown["state"]) == (job_id, 1, "succeeded"), shown
    assert shown["fate"] == f"requeued, resumed on {job.worker} (attempt 2), succeeded", shown
    # The rescuer, stopped cleanly, is "stopped", never "lost".
    rescuer.stop()
    other = rescuer.name.replace("%h", socket.gethostname())
    gone = wait_for(lambda: _lost(cluster, other), 30, "the rescuer to be listed as stopped")
    assert gone["state"] == "stopped" and gone["jobs"] == [], gone
