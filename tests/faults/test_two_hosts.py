"""Two worker "hosts" that share nothing but the database (PostgreSQL), Redis and an
S3 bucket (a real S3-compatible server on loopback): separate home and artifact
directories and, where this runs as root, separate host names (each worker in a UTS
namespace of its own, `unshare --uts`, so socket.gethostname() differs as on two
machines). A job starts on host A, host A is SIGKILLed mid-run, and the job resumes on
host B from A's checkpoint, which B can only have got from the bucket. The web, whose
own artifacts directory is neither host's, lists and serves both attempts' files.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shared.artifact_store import attempt_prefix, job_prefix, store_for
from shared.settings import Settings
from tests.conftest import REPO, settings_env, worker_zygote
from tests.faults.conftest import TERMINAL, Cluster, long_spec, wait_for
from tests.s3_server import new_bucket
from tests.worker_zygote import ZygoteChild

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("db_url", ["postgresql"], indirect=True),
]

SAME_AS_UNINTERRUPTED = (
    "train_loss", "val_loss", "val_accuracy", "val_f1", "lr", "best_metric_value",
    "best_epoch", "epochs_run", "steps",
)  # fmt: skip

# Own host names need a UTS namespace: root (as in CI here). Elsewhere the hosts still
# share nothing on disk, only their names match.
CAN_UNSHARE = os.geteuid() == 0 and shutil.which("unshare") is not None


@pytest.fixture
def settings(
    db_url: str, redis_url: str, tmp_path: Path, timings: dict[str, Any], s3_endpoint: str
) -> Settings:
    """The web's settings: job files in a fresh bucket, its own local dir unused."""
    known = {k: v for k, v in timings.items() if k in Settings.model_fields}
    return Settings(
        home=tmp_path / "web",
        database_url=db_url,
        redis_url=redis_url,
        artifacts_dir=tmp_path / "web" / "artifacts",
        artifacts_url=f"s3://{new_bucket(s3_endpoint)}/fleet",
        s3_endpoint_url=s3_endpoint,
        **known,
    )


class Host:
    """One worker host: its own home and artifact cache, its own host name."""

    def __init__(self, name: str, settings: Settings, tmp_path: Path, timings: dict[str, Any]):
        self.name = name
        self.home = tmp_path / name
        self.settings = settings.model_copy(
            update={"home": self.home, "artifacts_dir": self.home / "artifacts"}
        )
        self.log_path = tmp_path / f"worker-{name}.log"  # read by the invariant checker
        env = settings_env(self.settings)
        env.update({f"TRAINYARD_{k.upper()}": str(v) for k, v in timings.items()})
        env["TRAINYARD_ARTIFACTS_DIR"] = str(self.home / "artifacts")
        celery = [
            sys.executable, "-m", "celery", "-A", "worker.celery_worker:app", "worker",
            "-Q", "cpu", "--concurrency", "1", "--prefetch-multiplier", "1",
            "--loglevel", "INFO", "-n", f"worker@{name}", "--without-gossip",
            "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        zygote = worker_zygote()
        self.proc: subprocess.Popen[bytes] | ZygoteChild
        if zygote is not None:
            hostname = name if CAN_UNSHARE else ""
            self.proc = zygote.spawn(["celery", *celery[3:]], env, self.log_path, hostname)
        else:
            cmd = (
                ["unshare", "--uts", "sh", "-c", f'hostname {name} && exec "$@"', "sh", *celery]
                if CAN_UNSHARE
                else celery
            )
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 90) -> None:
        wait_for(
            lambda: b" ready." in self.log_path.read_bytes() or self.proc.poll() is not None,
            timeout,
            f"host {self.name}'s worker to start",
        )
        assert self.proc.poll() is None, self.log_path.read_text()[-3000:]

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def test_a_job_killed_on_host_a_resumes_on_host_b_from_the_bucket(
    cluster: Cluster, settings: Settings, tmp_path: Path, timings: dict[str, Any]
) -> None:
    store = store_for(settings)
    # Long enough (~0.2 s an epoch here, slower under load) that the first upload,
    # which waits for the sync thread's 2 s tick, comes well before the end.
    spec = long_spec(epochs=40)
    host_a = Host("host-a", settings, tmp_path, timings)
    hosts = [host_a]
    try:
        host_a.wait_ready()
        cluster.start_reconciler()
        job_id = cluster.submit(spec)
        # A's checkpoint counts once it is in the bucket, not when it is on A's disk.
        wait_for(
            lambda: store.size(f"{attempt_prefix(job_id, 1)}/last.pt") is not None,
            120,
            "attempt 1's first checkpoint in the bucket",
        )
        host_a.kill()
        assert cluster.job(job_id).state == "running", "the job ended before the kill"

        host_b = Host("host-b", settings, tmp_path, timings)
        hosts.append(host_b)
        host_b.wait_ready()
        reference_id = cluster.submit(spec)  # the same spec, never interrupted, on B
        job = cluster.wait_state(job_id, TERMINAL, timeout=240)
        reference = cluster.wait_state(reference_id, TERMINAL, timeout=240)
    finally:
        for host in hosts:
            host.stop()

    assert (job.state, job.attempt) == ("succeeded", 2), cluster.describe(job_id)
    assert reference.state == "succeeded", cluster.describe(reference_id)
    if CAN_UNSHARE:
        assert job.placement["host"] == "host-b" and job.worker.startswith("host-b:")
    metrics, expected = job.result["metrics"], reference.result["metrics"]
    assert metrics["resumed_from_epoch"] is not None and metrics["resumed_from_epoch"] >= 1
    for key in SAME_AS_UNINTERRUPTED:
        assert metrics[key] == expected[key], (key, metrics[key], expected[key])
    # Each host wrote only under its own home; B got A's checkpoint from the bucket.
    assert not (host_b.home / "artifacts" / "jobs" / str(job_id) / "attempt-2").is_symlink()
    assert not (host_a.home / "artifacts" / "jobs" / str(job_id) / "attempt-2").exists()

    # The web (its own directory is neither host's, and empty) lists and serves both.
    assert not (settings.resolved_artifacts_dir / "jobs").exists()
    listed = cluster.http.get(f"{cluster.url}/api/v1/jobs/{job_id}/artifacts").json()
    paths = {a["path"] for a in listed["artifacts"]}
    assert {"attempt-1/last.pt", "attempt-2/last.pt", "attempt-2/best.pt", "job.log"} <= paths
    got = cluster.http.get(f"{cluster.url}/api/v1/jobs/{job_id}/artifacts/attempt-1/last.pt")
    assert got.status_code == 200
    assert len(got.content) == store.size(f"{attempt_prefix(job_id, 1)}/last.pt")
    log = cluster.http.get(f"{cluster.url}/api/v1/jobs/{job_id}/logs?tail=400").json()["lines"]
    text = "\n".join(log)
    if CAN_UNSHARE:
        assert "claimed by host-a:" in text and "claimed by host-b:" in text, text
    assert "resuming from checkpoint" in text
    assert store.list(job_prefix(job_id))  # everything is in the bucket
