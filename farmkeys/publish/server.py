"""serve's HTTP server: waitress, with a whole-request deadline and a bounded waiting line.

waitress reads every connection on one asynchronous loop and hands a request to a
handler thread only once it has been wholly received, so a slow client holds a
socket and a little memory, never a thread. What it offers as knobs, and what
``[publish]`` sets them to:

- ``backlog``: the listen backlog (``publish.backlog``, at least 128);
- ``threads``: the handler threads (``publish.threads``);
- ``connection_limit``: past it waitress stops accepting, and new connections wait in
  the kernel's backlog until one closes (``publish.connection_limit``);
- ``channel_timeout``: closes a connection that has neither sent nor received a byte
  for that long: an inactivity timeout, which a client sending one byte every few
  seconds never reaches.

Two things it lacks, added here on waitress's internals (hence the pin
``waitress>=3.0.2,<3.1`` in pyproject.toml; docs/architecture.md says the same):

- **A whole-request deadline.** Each connection is timed from its accept, and again
  from the end of each answer: when ``publish.request_timeout_seconds`` pass without a
  whole request received (or the answer read), the loop closes it, whatever trickled in
  meanwhile. :class:`_Channel` keeps the time, :meth:`_Server.maintenance` (run by the
  loop every :data:`SWEEP_SECONDS`) closes it; no thread is involved.
- **Shedding.** When ``publish.max_queued`` requests already wait for a busy handler,
  the next one is answered ``503`` with ``Retry-After`` at once, by a thread of its own
  that runs no application code (:meth:`_Server.add_task`), rather than waiting behind
  the others. The queue depth is waitress's dispatcher's, read in the loop thread as
  each whole request arrives.

Stopping (:meth:`HTTPServer.stop`) wakes the loop, which stops accepting and closes
every connection; handlers still running are given :data:`STOP_SECONDS` to finish.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, cast

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, TcpWSGIServer
from waitress.task import Task, ThreadedTaskDispatcher
from waitress.utilities import Error as WaitressError

from farmkeys.config import PublishConfig
from farmkeys.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

log = logging.getLogger("farmkeys.publish")
# waitress warns of its queue's depth on every request queued behind a busy handler: in
# a crowd, a line per request. The sheds are logged here instead, once per hundred.
logging.getLogger("waitress.queue").setLevel(logging.ERROR)

# waitress's map of the loop's sockets: descriptor -> its dispatcher (the server, its
# trigger, each connection's channel).
_Channels = dict[int, Any]

# What a shed request is told: try again after this many seconds.
RETRY_AFTER_SECONDS: Final = 1
# How often the loop looks for connections past their deadline (waitress's whole seconds):
# a connection is closed between the deadline and a second and a bit after it.
SWEEP_SECONDS: Final = 1
# A GET has no body, and its line and headers fit in far less than waitress's defaults
# (256 KiB of headers, 1 GiB of body, spooled to a temporary file).
MAX_HEADER_BYTES: Final = 32 * 1024
MAX_BODY_BYTES: Final = 1024
# The sockets of waitress's loop that are not connections: the listening socket and the
# trigger that wakes the loop.
_LOOP_SOCKETS: Final = 2
# How long stopping waits for handlers still answering.
STOP_SECONDS: Final = 2
_SHED_BODY: Final = (
    f"busy: every handler is answering; try again in {RETRY_AFTER_SECONDS} s\n".encode()
)


class _Busy(WaitressError):
    """The answer to a request shed because every handler is busy: 503, Retry-After."""

    code = 503
    reason = "Service Unavailable"

    def __init__(self) -> None:
        super().__init__("")

    def to_response(  # type: ignore[override]  # the stub says the body is str; it is bytes
        self, ident: str | None = None
    ) -> tuple[str, Sequence[tuple[str, str]], bytes]:
        headers = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Retry-After", str(RETRY_AFTER_SECONDS)),
            ("Cache-Control", "no-store"),
        ]
        return f"{self.code} {self.reason}", headers, _SHED_BODY


class _Channel(HTTPChannel):
    """A waitress connection that remembers since when it has been waiting for a request."""

    def __init__(
        self,
        server: BaseWSGIServer,
        sock: socket.socket,
        addr: Any,  # noqa: ANN401  # what accept() returned, as waitress passes it on
        adj: Adjustments,
        map: _Channels | None = None,  # waitress's name
    ) -> None:
        super().__init__(server, sock, addr, adj, map)
        self.waiting_since = time.monotonic()

    def service(self) -> None:
        super().service()
        self.waiting_since = time.monotonic()  # the next request's deadline starts now


class _Server(TcpWSGIServer):
    """waitress's TCP server with the deadline and the shedding of the module docstring."""

    channel_class = _Channel

    def __init__(
        self,
        app: WSGIApplication,
        *,
        adj: Adjustments,
        channels: _Channels,
        dispatcher: ThreadedTaskDispatcher,
        deadline: float,
        max_queued: int,
    ) -> None:
        self.deadline = deadline
        self.max_queued = max_queued
        self.shed = 0  # requests answered 503 because every handler was busy
        self._shedder = ThreadedTaskDispatcher()
        self._shedder.set_thread_count(1)
        try:
            super().__init__(app, map=channels, dispatcher=dispatcher, adj=adj)
        except BaseException:
            self._shedder.shutdown(timeout=0)
            raise

    def waiting(self) -> int:
        """Requests received whole and waiting for a handler."""
        tasks = self.task_dispatcher
        with tasks.lock:
            idle = len(tasks.threads) - tasks.stop_count - tasks.active_count
            return max(0, len(tasks.queue) - idle)

    def busy(self) -> int:
        """Handlers answering a request now, or woken to answer a queued one."""
        tasks = self.task_dispatcher
        with tasks.lock:
            idle = len(tasks.threads) - tasks.stop_count - tasks.active_count
            return len(tasks.threads) - tasks.stop_count - max(0, idle - len(tasks.queue))

    def add_task(self, task: Task) -> None:
        channel = cast(HTTPChannel, task)  # waitress queues the channel itself
        if self.waiting() >= self.max_queued:
            self.shed += 1
            if self.shed == 1 or self.shed % 100 == 0:
                log.warning(
                    "every HTTP handler is busy and %d requests wait: answering 503 (%d so far)",
                    self.max_queued,
                    self.shed,
                )
            channel.requests[0].error = _Busy()
            self._shedder.add_task(task)
            return
        super().add_task(task)

    def maintenance(self, now: int) -> None:
        super().maintenance(now)  # waitress's own inactivity timeout
        cutoff = time.monotonic() - self.deadline
        channels = cast("dict[int, _Channel]", self.active_channels)
        for channel in list(channels.values()):
            if not channel.requests and channel.waiting_since < cutoff:
                channel.will_close = True  # the loop closes it on its next turn

    def stop_dispatchers(self) -> None:
        self.task_dispatcher.shutdown(timeout=STOP_SECONDS)
        self._shedder.shutdown(timeout=STOP_SECONDS)


class HTTPServer:
    """``app`` served on ``publish.listen`` with ``[publish]``'s limits; not started."""

    def __init__(self, app: WSGIApplication, config: PublishConfig) -> None:
        address = config.address
        if address is None:
            raise ValueError("publish.listen is not set")
        host, port = address
        adj = Adjustments(
            host=host,
            port=port,
            ipv4=":" not in host,
            ipv6=":" in host,
            threads=config.threads,
            # waitress counts every socket of its loop: the listening one and its trigger too.
            connection_limit=config.connection_limit + _LOOP_SOCKETS,
            backlog=config.backlog,
            # waitress's inactivity timeout, whole seconds: never sooner than the deadline.
            channel_timeout=math.ceil(config.request_timeout_seconds),
            cleanup_interval=SWEEP_SECONDS,
            asyncore_loop_timeout=SWEEP_SECONDS,
            # A GET has no body; a request is a line and a few headers.
            max_request_body_size=MAX_BODY_BYTES,
            max_request_header_size=MAX_HEADER_BYTES,
            asyncore_use_poll=True,  # select() cannot watch a descriptor above 1023
            ident="farmkeys",
            expose_tracebacks=False,
            log_socket_errors=False,
        )
        dispatcher = ThreadedTaskDispatcher()
        self._channels: _Channels = {}
        try:
            self._server = _Server(
                app,
                adj=adj,
                channels=self._channels,
                dispatcher=dispatcher,
                deadline=config.request_timeout_seconds,
                max_queued=config.max_queued,
            )
        except OSError as exc:
            dispatcher.shutdown(timeout=0)
            raise ConfigError(
                f"cannot listen on publish.listen {config.listen}: {exc.strerror or exc}",
                "choose a free port on an address of this host, or unset publish.listen",
            ) from None
        self._server.task_dispatcher.set_thread_count(config.threads)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def listening_socket(self) -> socket.socket:
        sock = self._server.socket
        assert sock is not None, "the server's socket is made by its constructor"
        return sock

    @property
    def port(self) -> int:
        return int(self.listening_socket.getsockname()[1])

    @property
    def waiting(self) -> int:
        """Requests received whole and waiting for a handler thread."""
        return self._server.waiting()

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._channels) - _LOOP_SOCKETS

    @property
    def busy(self) -> int:
        """Handler threads answering a request now."""
        return self._server.busy()

    @property
    def shed(self) -> int:
        """Requests answered 503 because every handler was busy, since start."""
        return self._server.shed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="farmkeys-publish", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, close every connection, and let running handlers finish (for at
        most :data:`STOP_SECONDS`). Prompt: the loop is woken, not waited for. Stopping
        again does nothing."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread is not None:
            self._server.pull_trigger()
            self._thread.join()
        else:
            self._close()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=SWEEP_SECONDS, use_poll=True, map=self._channels, count=1)
        finally:
            self._close()

    def _close(self) -> None:
        self._server.accepting = False
        self._server.stop_dispatchers()
        wasyncore.close_all(self._channels)
