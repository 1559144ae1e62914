"""shared/broker.py against a real redis-server reached three ways: redis:// on TCP,
rediss:// with TLS (certificates made here with openssl), and redis+socket:// on a unix
socket. Each URL form must work for every client: /healthz, Celery's own publishing
connection, the queue readers and the worker registry."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from limits import parse
from pydantic import ValidationError

from shared import broker
from shared.celery_app import make_celery, publish_job, task_id_for
from shared.settings import Settings
from shared.worker_registry import SlotHeartbeat, SlotInfo, online_slots

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("openssl") is None,
    reason="needs redis-server (built with TLS) and openssl",
)


@dataclass(frozen=True)
class Endpoints:
    tcp: str
    tls: str  # verified against the test CA
    socket: str
    ca: Path

    def url(self, form: str) -> str:
        return {"redis": self.tcp, "rediss": self.tls, "redis+socket": self.socket}[form]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    )
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
            "-out", str(ca), "-days", "2", "-subj", "/CN=trainyard-test-ca")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", "/CN=127.0.0.1")  # fmt: skip
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return ca, cert, key


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    """One private redis-server listening on TCP, on TLS and on a unix socket."""
    directory = tmp_path_factory.mktemp("tls-redis")
    ca, cert, key = _make_certs(directory)
    port, tls_port = _free_port(), _free_port()
    sock = directory / "redis.sock"
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--tls-port", str(tls_port),
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
         "--tls-auth-clients", "no", "--unixsocket", str(sock), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, "redis-server exited (no TLS support in this build?)"
            time.sleep(0.05)
        yield Endpoints(
            tcp=f"redis://127.0.0.1:{port}/0",
            tls=f"rediss://127.0.0.1:{tls_port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}",
            socket=f"redis+socket://{sock}",
            ca=ca,
        )
    finally:
        proc.terminate()
        proc.wait(10)


FORMS = ["redis", "rediss", "redis+socket"]


@pytest.fixture
def flushed(endpoints: Endpoints) -> Endpoints:
    client = broker.redis_client(endpoints.tcp)
    client.flushall()
    client.close()
    return endpoints


@pytest.mark.parametrize("form", FORMS)
def test_healthz_reaches_redis_through_each_url_form(
    flushed: Endpoints, form: str, tmp_path: Path
) -> None:
    from server.app import create_app

    settings = Settings(
        home=tmp_path, database_url=f"sqlite:///{tmp_path}/t.db", redis_url=flushed.url(form)
    )
    app = create_app(settings)
    resp = app.test_client().get("/healthz")
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["broker"] == "ok"
    # The submission rate limit counts in the same Redis (it fails open, so a limiter
    # that cannot reach Redis would let the second hit through).
    limits = app.extensions["trainyard_submit_limits"]
    once = parse("1/minute")
    assert limits.hit(once, "broker-test", form) and not limits.hit(once, "broker-test", form)


def test_rediss_verifies_the_certificate_unless_told_not_to(
    flushed: Endpoints, tmp_path: Path
) -> None:
    from server.app import create_app

    tls = flushed.tls.split("?")[0]
    # No CA given: the test CA is not among the system's, so verification must fail...
    unverified = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path}/t.db", redis_url=tls)
    resp = create_app(unverified).test_client().get("/healthz")
    assert resp.status_code == 503 and resp.get_json()["broker"].startswith("error")
    # ...unless the URL explicitly turns it off, as kombu's own spelling allows.
    optout = tls + "?ssl_cert_reqs=CERT_NONE"
    broker.ping(optout)
    assert broker.celery_ssl_options(optout)["ssl_cert_reqs"] == 0  # ssl.CERT_NONE


@pytest.mark.parametrize("form", FORMS)
def test_celery_publishes_and_the_readers_see_it_through_each_url_form(
    flushed: Endpoints, form: str, tmp_path: Path
) -> None:
    url = flushed.url(form)
    celery = make_celery(Settings(home=tmp_path, redis_url=url))
    try:
        publish_job(celery, 41, "train", "cpu")
    finally:
        celery.close()
    client = broker.redis_client(url)
    try:
        assert broker.queue_depths(client, ["cpu", "gpu"]) == {"cpu": 1, "gpu": 0}
        seen = broker.read_messages(client, ["cpu"])
        assert seen.waiting == {task_id_for(41)} and seen.holds(task_id_for(41), time.time())
        assert not seen.holds(task_id_for(42), reserved_since=1.0)
    finally:
        client.close()


@pytest.mark.parametrize("form", FORMS)
def test_the_worker_registry_works_through_each_url_form(flushed: Endpoints, form: str) -> None:
    info = SlotInfo(name=f"h:{form}", node="n@h", host="h", pid=1, queues=("cpu",), node_slots=1)
    beat = SlotHeartbeat(flushed.url(form), info, interval_s=60)
    beat.start()
    try:
        client = broker.redis_client(flushed.url(form))
        assert [s.name for s in online_slots(client)] == [info.name]
        client.close()
    finally:
        beat.stop()


def test_priority_lists_and_the_unacked_hash_are_read(flushed: Endpoints) -> None:
    """kombu's layout: one list per priority step, reserved messages in `unacked`."""
    client = broker.redis_client(flushed.tcp)
    message = '{"headers": {"id": "%s"}}'
    lists = broker.queue_lists("cpu")
    assert lists[0] == "cpu" and all(n.startswith("cpu" + broker.PRIORITY_SEP) for n in lists[1:])
    client.rpush(lists[0], message % "a")
    client.rpush(lists[-1], message % "b", "not json")
    client.hset(broker.UNACKED_HASH, "tag-1", f'[{message % "c"}, "", "cpu"]')
    client.zadd(broker.UNACKED_INDEX, {"tag-1": 100.0})
    client.hset(broker.UNACKED_HASH, "tag-2", f'[{message % "d"}, "", "cpu"]')  # not indexed yet
    assert broker.queue_depths(client, ["cpu"]) == {"cpu": 3}
    seen = broker.read_messages(client, ["cpu"])
    assert seen.waiting == {"a", "b"}
    assert seen.reserved["c"] == 100.0 and seen.reserved["d"] == float("inf")
    assert seen.holds("c", reserved_since=50.0) and not seen.holds("c", reserved_since=150.0)
    client.close()


@pytest.mark.parametrize(
    "url, says",
    [
        ("localhost:6379", "must start with one of redis://, rediss://, redis+socket://"),
        ("amqp://guest@localhost//", "must start with one of"),
        ("redis://", "needs a host"),
        ("redis+socket://", "needs the socket's path"),
        ("rediss://h:6380/0?ssl_cert_reqs=maybe", "ssl_cert_reqs='maybe'"),
    ],
)
def test_settings_refuse_a_redis_url_no_client_could_use(url: str, says: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(redis_url=url)
    assert "TRAINYARD_REDIS_URL" in str(err.value) and says in str(err.value)


def test_a_dead_redis_is_an_error_within_the_timeout() -> None:
    started = time.monotonic()
    with pytest.raises((redis.RedisError, OSError)):
        broker.ping("redis://127.0.0.1:1/0", timeout_s=1)
    assert time.monotonic() - started < 5
