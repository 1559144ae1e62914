"""Checks `trainyard up` makes before it starts anything, each failing with one line.

A problem found here costs the user one message; found later, it costs a half-started
system to stop, and usually a log to read.
"""

from __future__ import annotations

import errno
import socket

import click

from server.cli.install_checks import InstallError


def check_port_free(host: str, port: int) -> None:
    """Raise unless the web server could listen on host:port."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from None
    with socket.socket(family, kind, proto) as sock:
        # As gunicorn does, so a socket in TIME_WAIT from the last run is not "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise click.ClickException(
                    f"port {port} on {host} is already in use (another Trainyard or another "
                    "server?); stop it or choose another with --port"
                ) from None
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def check_redis_answers(url: str) -> None:
    """Raise unless the Redis at TRAINYARD_REDIS_URL answers PING."""
    import redis

    from shared import broker

    try:
        broker.ping(url)
    except (redis.RedisError, OSError) as exc:
        raise click.ClickException(f"TRAINYARD_REDIS_URL={url} does not answer: {exc}") from None


def require_redis_server() -> None:
    """Raise InstallError unless there is a redis-server binary for the embedded Redis."""
    # Imported here: it imports redis-py, which `trainyard up --help` need not load.
    from server.cli.local.embedded_redis import LocalRedisError, find_redis_server

    try:
        find_redis_server()
    except LocalRedisError as exc:
        raise InstallError(str(exc)) from None
