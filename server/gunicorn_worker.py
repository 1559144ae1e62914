"""Trainyard's gunicorn worker class: gthread, except for two things a thread per
connection cannot afford (docs/architecture.md, "Live job pages" and "Slow clients").

1. Request headers are read by the worker's event loop, not by a request thread. A
   connection reaches the thread pool only once its whole header block has arrived;
   one that has not sent it within `TRAINYARD_HEADER_TIMEOUT_SECONDS` is closed. With
   plain gthread a client that trickles one header line every few seconds held a
   thread for as long as it liked, and 40 such sockets stalled every other request.
2. Job streams (`/jobs/<id>/stream`) leave the thread pool once their response
   starts: the view leaves a `HandOff` in the WSGI environ (server/web/job_page.py),
   and this worker writes the response head itself, gives the socket and the stream's
   steps to the process's stream hub (server/stream_hub.py) and frees the thread.

Everything else (CPU-heavy uploads, SQLite, the pages) runs in request threads as
before. This subclasses gunicorn's ThreadWorker and uses a few of its internals
(`TConn`, `finish_request`, `nr_conns`, the poller), so pyproject.toml pins gunicorn's
major version; tests/test_web_availability.py runs the real server.

gunicorn imports this module in its master process to find the class: it imports
nothing of Flask or the database at module level.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import time
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker

# A header block larger than this is refused (431) without a request thread: no real
# browser or client sends one (nginx's default allows 32 KiB), and handing a partial
# block to a thread would let a client trickle the rest while holding it.
MAX_HEADER_BYTES = 64 * 1024
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n"
)
_DETACHED = object()

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _headers_complete(buf: bytearray) -> bool:
    return b"\r\n\r\n" in buf or b"\n\n" in buf


class TrainyardWorker(ThreadWorker):
    """gthread with evented header reading and a stream hub (see the module docstring)."""

    def init_process(self) -> None:
        from server.stream_hub import StreamHub
        from shared.settings import load_settings

        self.header_timeout = load_settings().header_timeout_seconds
        self.reading: deque[TConn] = deque()  # ordered by deadline: all share one timeout
        self.detached: set[int] = set()  # id() of sockets handed to the hub
        self.hub = StreamHub()
        self.hub.start()
        super().init_process()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.wsgi = self._take_streams(self.wsgi)

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.hub.stop()

    # ------------------------------------------------------------------ headers

    def accept(self, listener: Any) -> None:
        if self.cfg.is_ssl:
            # The TLS handshake must happen in a thread; gunicorn's own path does it.
            # Trainyard terminates TLS in the reverse proxy (README "Deploying").
            super().accept(listener)
            return
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())
        self._read_headers(conn)

    def on_client_socket_readable(self, conn: TConn, client: Any) -> None:
        # A kept-alive connection's next request: its headers are read here too.
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._read_headers(conn)

    def _read_headers(self, conn: TConn) -> None:
        conn.sock.setblocking(False)
        conn.header_buf = bytearray()  # type: ignore[attr-defined]
        conn.timeout = time.monotonic() + self.header_timeout
        self.reading.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_header_bytes, conn))

    def _on_header_bytes(self, conn: TConn, client: Any) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_reading(conn)
            return
        buf: bytearray = conn.header_buf  # type: ignore[attr-defined]
        buf += data
        if not _headers_complete(buf):
            if len(buf) > MAX_HEADER_BYTES:
                with contextlib.suppress(OSError):
                    conn.sock.send(_TOO_LARGE)
                self._drop_reading(conn)
            return
        self.poller.unregister(conn.sock)
        self.reading.remove(conn)
        try:
            conn.sock.setblocking(True)
            conn.init()  # plain HTTP/1.x here: creates the parser, reads nothing
            conn.parser.unreader.unread(bytes(buf))
        except Exception:  # noqa: BLE001 - one bad connection, not the worker's loop
            self.log.debug("dropping a connection that could not start", exc_info=True)
            self.nr_conns -= 1
            conn.close()
            return
        conn.data_ready = True
        self.enqueue_req(conn)

    def _drop_reading(self, conn: TConn) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        self.reading.remove(conn)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        # A stopping worker serves no new request: it does not wait for headers either.
        while self.reading and (self.reading[0].timeout <= now or not self.alive):
            self._drop_reading(self.reading[0])

    # ------------------------------------------------------------------ streams

    def _take_streams(self, app: WsgiApp) -> WsgiApp:
        from server.stream_hub import ENVIRON_KEY

        def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            started: list[Any] = []

            def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                if environ.get(ENVIRON_KEY) is not None and status.startswith("200"):
                    started[:] = [status, headers]
                    return lambda _data: None
                return start_response(status, headers, exc_info)

            body = app(environ, start)
            handoff = environ.get(ENVIRON_KEY)
            if not started or handoff is None:
                return body
            status, headers = started
            handoff.taken = True
            if hasattr(body, "close"):
                body.close()  # never iterated: the hub drives the steps
            if environ.get("REQUEST_METHOD") != "GET":
                # HEAD: the head alone, from gunicorn as usual; nothing to stream.
                handoff.on_close()
                start_response(status, headers)
                return []
            sock = environ["gunicorn.socket"]
            # gunicorn's response object sends nothing more: its head is "sent" (by the
            # hub) and the connection ends with the stream, which frames the body.
            resp = start_response.__self__
            resp.status = status
            resp.headers_sent = True
            resp.force_close()
            head = [f"HTTP/1.1 {status}\r\n"]
            head += [f"{name}: {value}\r\n" for name, value in headers]
            head.append("Connection: close\r\n\r\n")
            self.detached.add(id(sock))
            self.hub.add(sock, "".join(head).encode("latin-1"), handoff.steps, handoff.on_close)
            return []

        return wrapped

    def handle(self, conn: TConn) -> Any:
        result = super().handle(conn)
        if id(conn.sock) in self.detached:
            self.detached.discard(id(conn.sock))
            return _DETACHED
        return result

    def finish_request(self, conn: TConn, fs: Any) -> None:
        if not fs.cancelled() and fs.exception() is None and fs.result() is _DETACHED:
            # The hub owns the socket now: not ours to close or keep alive.
            self.nr_conns -= 1
            return
        super().finish_request(conn, fs)
