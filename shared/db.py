"""SQLAlchemy engine and session helpers.

One engine per (process, URL): Celery's prefork children and gunicorn workers inherit
the parent's memory, and a pooled connection shared across fork corrupts both sides,
so the cache is keyed by pid and an inherited engine is dropped, never reused.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}
# One sessionmaker per engine, under the same key: each sessionmaker makes a Session
# subclass whose event dispatch SQLAlchemy sets up again on first use, which cost ~2 ms
# a request when one was made per call.
_factories: dict[tuple[int, str], sessionmaker[Session]] = {}


def utcnow() -> datetime:
    """Naive UTC: SQLite has no time zones, so every stored timestamp is UTC without one."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def make_engine(url: str) -> Engine:
    """A new engine; SQLite gets WAL, a busy timeout and foreign keys (docs/architecture.md, "Reliability" R9)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            # WAL lets the web process read while a worker writes.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def get_engine(url: str) -> Engine:
    """The engine for `url` in this process, created on first use after any fork."""
    key = (os.getpid(), url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = make_engine(url)
            _engines[key] = engine
        return engine


def dispose_inherited_engines() -> None:
    """Forget engines created by a parent process; call right after fork."""
    pid = os.getpid()
    with _lock:
        for key in [k for k in _engines if k[0] != pid]:
            # close=False: the parent still owns those sockets; just drop our references.
            _engines.pop(key).dispose(close=False)
            _factories.pop(key, None)


def session_factory(url: str) -> sessionmaker[Session]:
    """The session factory for `url`'s engine in this process (one per engine)."""
    key = (os.getpid(), url)
    factory = _factories.get(key)  # the request path: no lock once it exists
    if factory is None:
        engine = get_engine(url)
        with _lock:
            factory = _factories.setdefault(key, sessionmaker(bind=engine, expire_on_commit=False))
    return factory


@contextmanager
def transaction(url: str) -> Iterator[Session]:
    """A short session that commits on success and rolls back on error."""
    with session_factory(url).begin() as session:
        yield session
