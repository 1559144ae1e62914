"""A script job's worker dies mid-run (issue 14): its script dies with it, and the job
resumes on another worker from the checkpoint the script left."""

from __future__ import annotations

import json
import os
import signal
from contextlib import closing

import psutil
import pytest

from shared.celery_app import make_celery, publish_job
from tests.conftest import SQLITE_ONLY
from tests.faults.conftest import TERMINAL, Cluster, wait_for
from tests.script_jobs import add_bundle, insert_script_job

pytestmark = pytest.mark.integration

EPOCHS = 20
# One epoch every 0.3 s, a checkpoint after each: 6 s in all, time enough to kill the
# worker after a few epochs and see another finish the rest.
RESUMABLE = """
    import json, os, subprocess, time
    from worker import sdk

    epochs = sdk.params["epochs"]
    start = 0
    if sdk.resume_from is not None:
        start = json.loads((sdk.resume_from / "state.json").read_text())["epoch"]
    sdk.save_checkpoint(str(os.getpid()).encode(), name="pid")
    # A process of the script's own (in its group, with its environment): the death
    # signal is the script's only, so this one outlives a killed worker.
    helper = subprocess.Popen(["sleep", "1000"])
    sdk.save_checkpoint(str(helper.pid).encode(), name="helper-pid")
    for epoch in range(start + 1, epochs + 1):
        time.sleep(0.3)
        sdk.log("val_loss", 1.0 / epoch, step=epoch, epoch=epoch)
        sdk.progress(epoch=epoch, epochs=epochs)
        sdk.save_checkpoint(json.dumps({"epoch": epoch}).encode(), name="state.json")
        if sdk.should_stop():
            raise SystemExit(0)
    sdk.finish({"resumed_from_epoch": start, "epochs_run": epochs})
"""


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@SQLITE_ONLY
def test_a_killed_workers_script_dies_and_the_job_resumes_elsewhere(cluster: Cluster) -> None:
    workers = cluster.start_workers(2)
    cluster.start_reconciler()
    bundle = add_bundle(cluster.settings, {"train.py": RESUMABLE})
    job_id = insert_script_job(cluster.settings, bundle, params={"epochs": EPOCHS})
    with closing(make_celery(cluster.settings)) as app:
        publish_job(app, job_id, "script", "cpu")

    attempt_1 = cluster.checkpoint(job_id, 1).parent
    wait_for(
        lambda: (
            (attempt_1 / "state.json").is_file()
            and json.loads((attempt_1 / "state.json").read_text())["epoch"] >= 2
        ),
        90,
        "attempt 1's script to checkpoint two epochs",
    )
    script_pid = int((attempt_1 / "pid").read_text())
    helper_pid = int((attempt_1 / "helper-pid").read_text())
    assert not gone(script_pid) and not gone(helper_pid)
    victim = cluster.worker_holding(cluster.job(job_id), workers)
    os.killpg(victim.proc.pid, signal.SIGKILL)  # the worker's group: not the script's
    victim.proc.wait(10)
    # PR_SET_PDEATHSIG: the kernel kills the script with the pool process that ran it.
    wait_for(lambda: gone(script_pid), 10, "the script to die with its worker")
    assert cluster.job(job_id).state == "running", "the job ended before the kill"

    job = cluster.wait_state(job_id, TERMINAL, timeout=120)
    assert (job.state, job.attempt) == ("succeeded", 2), cluster.describe(job_id)
    # The next script attempt on this host swept what the dead worker's left behind:
    # its script's own process, and its work directory.
    assert gone(helper_pid)
    assert not list((cluster.settings.home / "script-work").glob(f"job-{job_id}-attempt-1"))
    resumed = job.result["metrics"]["resumed_from_epoch"]
    assert resumed >= 2, job.result
    # Attempt 2 picked up after the checkpoint it was handed, and went on to the end.
    assert cluster.epochs_logged(job_id, 2) == list(range(resumed + 1, EPOCHS + 1))
    # Attempt 1's points up to its last flush before the kill (a buffer dies with it).
    first = cluster.epochs_logged(job_id, 1)
    assert first == list(range(1, len(first) + 1)) and len(first) <= resumed + 1, first
