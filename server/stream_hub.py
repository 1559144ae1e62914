"""One thread per web process that serves every open job stream (SSE) of that process.

A job page's stream lives for up to `STREAM_SECONDS` and mostly waits. With one request
thread per open stream, 16 open job tabs took all 16 of gunicorn's request threads and
`/healthz` waited 26 s (issue 11). Under gunicorn, Trainyard's worker class
(server/gunicorn_worker.py) therefore answers the stream request in a request thread
(authentication, the job's visibility, the stream caps, the response head) and then
hands the socket to this hub and frees the thread. The hub drives each stream's steps
(server/job_stream.py `stream_steps`: a message to send, or how long to wait before the
next poll), writes with non-blocking sends from one selector loop, and notices a client
that went away by its socket becoming readable with EOF. See docs/architecture.md,
"Live job pages".

What the hub costs per stream is a socket, a small buffer and one short poll of the
database per `POLL_SECONDS` (less often while a stream's polls find nothing new: a
queued job, a long epoch), made in this thread: the polls of all streams of a process
are serialised here, so their work competes with requests for the interpreter only as
much as one thread can. A client that stops reading (its buffer past `MAX_BUFFER_BYTES`)
or a stream whose step fails is closed; the browser reconnects with its cursor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# A client further behind than this is not reading: drop it (it reconnects and resumes).
MAX_BUFFER_BYTES = 1 << 20
# The loop wakes at least this often, to run streams that are due.
MAX_WAIT_SECONDS = 1.0
# A stream whose polls keep finding nothing new (a queued job, a long epoch) is polled
# less often: its wait grows by one poll interval per this many empty polls, up to
# QUIET_MAX_FACTOR times the interval. Anything new brings it back to every interval.
QUIET_POLLS_PER_STEP = 5
QUIET_MAX_FACTOR = 3


# Where a stream view leaves its `HandOff` in the WSGI environ for the worker class.
ENVIRON_KEY = "trainyard.live_stream"


@dataclass(eq=False)
class HandOff:
    """A stream response the server may take over: its steps, and what to run when the
    stream ends. `taken` is set by whoever drives the steps from then on."""

    steps: Iterator[str | float]
    on_close: Callable[[], None]
    taken: bool = False


@dataclass(eq=False)
class _Stream:
    sock: socket.socket
    steps: Iterator[str | float]
    on_close: Callable[[], None]
    out: bytearray = field(default_factory=bytearray)
    due: float = 0.0
    finished: bool = False
    writing: bool = False
    quiet: int = 0  # polls in a row that sent nothing but keep-alives


class StreamHub:
    """Serves handed-over SSE responses from one daemon thread.

    `add` is called from request threads; everything else happens in the hub's thread.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._incoming: queue.SimpleQueue[_Stream] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._streams: set[_Stream] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainyard-stream-hub", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def __len__(self) -> int:
        return len(self._streams)

    def add(
        self,
        sock: socket.socket,
        head: bytes,
        steps: Iterator[str | float],
        on_close: Callable[[], None],
    ) -> None:
        """Take over `sock`: send `head` (the response's status line and headers), then
        the stream's messages; `on_close` runs once when the stream ends, however."""
        stream = _Stream(sock=sock, steps=steps, on_close=on_close, out=bytearray(head))
        if self._stopping.is_set():
            self._close(stream, registered=False)
            return
        self._incoming.put(stream)
        self._wake()

    def stop(self, timeout: float = 2.0) -> None:
        """Close every stream (the browsers reconnect elsewhere) and end the thread."""
        self._stopping.set()
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the hub's thread

    def _wake(self) -> None:
        # A full pipe means the loop is about to wake anyway.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._turn()
        except Exception:  # noqa: BLE001 - a bug here must not take the web process down
            log.exception("stream hub stopped")
        finally:
            for stream in list(self._streams):
                self._close(stream)
            while not self._incoming.empty():
                self._close(self._incoming.get_nowait(), registered=False)

    def _turn(self) -> None:
        now = self._clock()
        pending = [s.due for s in self._streams if not s.finished]
        wait = min([MAX_WAIT_SECONDS, *(d - now for d in pending)])
        for key, mask in self._selector.select(max(0.0, wait)):
            stream = key.data
            if stream is None:
                self._take_incoming()
                continue
            if stream not in self._streams:
                continue
            if mask & selectors.EVENT_READ and not self._client_alive(stream):
                self._close(stream)
                continue
            if mask & selectors.EVENT_WRITE:
                self._flush(stream)
        now = self._clock()
        for stream in [s for s in self._streams if not s.finished and s.due <= now]:
            self._advance(stream)

    def _take_incoming(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                stream = self._incoming.get_nowait()
            except queue.Empty:
                return
            try:
                stream.sock.setblocking(False)
                self._selector.register(stream.sock, selectors.EVENT_READ, stream)
            except (OSError, ValueError):
                self._close(stream, registered=False)
                continue
            self._streams.add(stream)
            stream.due = self._clock()
            self._advance(stream)

    def _client_alive(self, stream: _Stream) -> bool:
        """Read whatever the client sent (nothing is expected); False on EOF or error."""
        try:
            return bool(stream.sock.recv(4096))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False

    def _advance(self, stream: _Stream) -> None:
        """Run the stream's steps up to its next wait, then send what they produced."""
        news = False
        while True:
            try:
                step = next(stream.steps)
            except StopIteration:
                stream.finished = True
                break
            except Exception:  # noqa: BLE001 - one broken stream, not the hub
                log.exception("job stream failed")
                stream.finished = True
                break
            if isinstance(step, str):
                stream.out += step.encode()
                news = news or not step.startswith(":")
                continue
            stream.quiet = 0 if news else stream.quiet + 1
            slower = min(QUIET_MAX_FACTOR, 1 + stream.quiet // QUIET_POLLS_PER_STEP)
            stream.due = self._clock() + step * slower
            break
        if len(stream.out) > MAX_BUFFER_BYTES:
            self._close(stream)
            return
        self._flush(stream)

    def _flush(self, stream: _Stream) -> None:
        if stream.out:
            try:
                sent = stream.sock.send(stream.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(stream)
                return
            del stream.out[:sent]
        if not stream.out and stream.finished:
            self._close(stream)
            return
        writing = bool(stream.out)
        if writing != stream.writing:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self._selector.modify(stream.sock, events, stream)
            stream.writing = writing

    def _close(self, stream: _Stream, *, registered: bool = True) -> None:
        self._streams.discard(stream)
        if registered:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(stream.sock)
        with contextlib.suppress(OSError):
            stream.sock.close()
        try:
            stream.steps.close()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001
            log.debug("closing a stream's steps failed", exc_info=True)
        try:
            stream.on_close()
        except Exception:  # noqa: BLE001
            log.exception("releasing a stream's slot failed")
