"""A real S3-compatible HTTP server on loopback for the object-store tests: moto's
standalone server (`moto[server]`) in a subprocess of its own, so its request handling
does not share the GIL with the tests. Nothing leaves the machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

# moto accepts any credentials; boto3 only needs some to sign requests.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "trainyard-test",
    "AWS_SECRET_ACCESS_KEY": "trainyard-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def s3_server() -> Iterator[str]:
    """Start the server; yields its endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **CREDENTIALS},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(url, timeout=1)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


# The running server's endpoint, for checks that meet an s3:// URL without settings
# (tests/faults/conftest.py's invariant checker); set by the s3_endpoint fixture.
ENDPOINT_VARIABLE = "TRAINYARD_TEST_S3_ENDPOINT"


def fetch_url(url: str, local: Path) -> bool:
    """Download the object at `url` (s3://bucket/key) from the running test server."""
    from shared.artifact_store import S3Store

    bucket, _, key = url.removeprefix("s3://").partition("/")
    return S3Store(f"s3://{bucket}", os.environ[ENDPOINT_VARIABLE]).get_file(key, local)


def new_bucket(endpoint: str) -> str:
    """A fresh bucket for one test; its name."""
    import boto3

    name = f"trainyard-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint, **_client_credentials())
    client.create_bucket(Bucket=name)
    return name


def _client_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }
