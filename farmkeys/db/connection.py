"""The connection to the config DB: opened lazily, retried, reopened after a loss, shared
by threads, and listening for notifications.

Connecting is retried with backoff for transient failures; a refused login (wrong
password, unknown role or database) fails at once. Every error names the endpoint as
``host:port/dbname as user``, never the password. The queries themselves live beside
this module, one module per table (:mod:`farmkeys.db`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Self, TypeVar

import psycopg
from psycopg import Notify
from psycopg import errors as pgerrors
from psycopg.abc import Params
from psycopg.rows import dict_row

from farmkeys._retry import RetryExhaustedError, call_with_retry
from farmkeys.config import DatabaseConfig, RetryConfig
from farmkeys.errors import DatabaseError, DatabaseUnreachableError, NotInitialisedError

log = logging.getLogger(__name__)

Cursor = psycopg.Cursor[dict[str, Any]]
S = TypeVar("S", bound="Statements")

# NOTIFY channels: the live set changed; a rollover was requested.
CHANGED_CHANNEL = "farmkeys_changed"
REQUEST_CHANNEL = "farmkeys_request"

# FATAL errors at connect time that pass: the server is starting, stopping or full.
_TRANSIENT_FATAL = (
    "starting up",
    "shutting down",
    "in recovery mode",
    "too many clients",
    "remaining connection slots",
)


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname as user``: the endpoint without any password. A DSN that lists
    several hosts (libpq's ``host=a,b port=p,q``, for a config DB that fails over) names
    each: ``a:p,b:q/dbname``."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "the config DB (unparsable dsn)"
    hosts = str(info.get("host") or info.get("hostaddr") or "localhost").split(",")
    ports = str(info.get("port") or 5432).split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    endpoints = ",".join(
        f"{h or 'localhost'}:{p or 5432}" for h, p in zip(hosts, ports, strict=False)
    )
    dbname = str(info.get("dbname") or info.get("user") or "?")
    user = info.get("user")
    return f"{endpoints}/{dbname}" + (f" as {user}" if user else "")


def _is_transient(exc: BaseException) -> bool:
    if not isinstance(exc, psycopg.OperationalError):
        return False
    text = str(exc)
    if "FATAL:" not in text:
        return True  # refused, timed out, reset: the server was not there to say no
    return any(marker in text for marker in _TRANSIENT_FATAL)


def _cause(exc: BaseException) -> str:
    """The server's reason, on one line, without libpq's boilerplate."""
    text = " ".join(str(exc).split())
    text = text.removeprefix("connection failed: ")
    return re.sub(r"\s*Is the server running on that host.*$", "", text)


class Connection:
    """A connection to the config DB, opened lazily and reopened after a loss.

    Threads may share one: each statement, and each transaction as a whole, holds the
    object's lock, so no thread's statement lands inside another's transaction. With
    ``listen``, every (re)connection LISTENs on those channels and :meth:`wait` returns
    the notifications, without holding the lock while it waits: `serve` carries its
    LISTEN, heartbeat, lease and sync reads on one connection this way.
    """

    def __init__(
        self,
        config: DatabaseConfig,
        retry: RetryConfig,
        *,
        idle_in_transaction_seconds: float = 60.0,
        listen: Sequence[str] = (),
        application_name: str = "farmkeys",
    ) -> None:
        """``idle_in_transaction_seconds``: the server ends a transaction whose client
        went silent inside it (a stopped or partitioned process) after this long,
        releasing its locks: a frozen leader never holds the lease row for good.
        ``listen``: NOTIFY channels to listen on (see :meth:`wait`)."""
        try:
            psycopg.conninfo.conninfo_to_dict(config.dsn)
        except psycopg.ProgrammingError:
            raise DatabaseError(
                "database.dsn is not a valid libpq connection string or URL",
                "correct database.dsn",
            ) from None
        self._config = config
        self._retry = retry
        self._idle_ms = max(1, int(idle_in_transaction_seconds * 1000))
        self._conn: psycopg.Connection[dict[str, Any]] | None = None
        self._lock = threading.RLock()
        self._listen = tuple(listen)
        self._application_name = application_name
        # Wakes wait() when another thread used the connection: the notifications that
        # arrived during its statement wait in psycopg's backlog, not on the socket.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC) if listen else (-1, -1)
        self.endpoint = describe_dsn(config.dsn)
        self.statements = 0  # statements sent, for tests that prove how much a sync costs
        self.connects = 0  # connections made; a new one may have missed notifications

    # -- connection -----------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def dispose(self) -> None:
        """Close the connection and release what :meth:`wait` uses; the object is done."""
        self.close()
        for descriptor in (self._wake_r, self._wake_w):
            if descriptor >= 0:
                os.close(descriptor)
        self._wake_r = self._wake_w = -1

    def connection(self, retry: RetryConfig | None = None) -> psycopg.Connection[dict[str, Any]]:
        """The open connection, connecting when there is none, with retries under ``retry``
        (default: the object's own policy)."""
        with self._lock:
            return self._connection(retry)

    def _connection(self, retry: RetryConfig | None = None) -> psycopg.Connection[dict[str, Any]]:
        if self._conn is not None and not self._conn.closed:
            return self._conn

        def attempt() -> psycopg.Connection[dict[str, Any]]:
            return psycopg.connect(
                self._config.dsn,
                autocommit=True,
                connect_timeout=self._config.connect_timeout_seconds,
                row_factory=dict_row,
                application_name=self._application_name,
                # Times come back in UTC whatever the server's zone; a silent client's
                # open transaction is ended by the server; no JIT compilation: every
                # statement here reads a few rows, and compiling one costs ~400 ms.
                options=(
                    f"-c TimeZone=UTC -c idle_in_transaction_session_timeout={self._idle_ms}"
                    " -c jit=off"
                ),
            )

        try:
            self._conn = call_with_retry(
                attempt,
                policy=retry or self._retry,
                is_transient=_is_transient,
                what=f"config DB {self.endpoint}",
            )
        except RetryExhaustedError as exc:
            raise DatabaseUnreachableError(
                f"cannot reach the config DB at {self.endpoint} {exc.summary()}: "
                f"{_cause(exc.last)}",
                "check that PostgreSQL is running and reachable from this node",
            ) from exc
        except psycopg.OperationalError as exc:
            raise DatabaseError(
                f"the config DB at {self.endpoint} refused the login: {_cause(exc)}",
                "check database.dsn: the user, its password and the database name",
            ) from exc
        self.connects += 1
        for channel in self._listen:
            with self._conn.cursor() as cur:
                self._execute(cur, f"LISTEN {channel}")
        return self._conn

    def wait(self, timeout: float) -> list[Notify]:
        """The notifications on the ``listen`` channels, waiting up to ``timeout`` seconds
        for one; connects (with retries) when not connected. The lock is not held while
        waiting, so other threads use the connection meanwhile. :class:`DatabaseError`
        when the connection is lost (the next call reconnects and LISTENs again)."""
        if self._wake_r < 0:
            raise ValueError("wait() needs a ConfigDB made with listen=")
        found = self._drain()
        if found:
            return found
        conn = self.connection()
        # OSError, ValueError: closed meanwhile by another thread; _drain reconnects or says why.
        with contextlib.suppress(OSError, ValueError):
            select.select([conn.fileno(), self._wake_r], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        return self._drain()

    def _drain(self) -> list[Notify]:
        with self._lock:
            conn = self._connection()
            try:
                return list(conn.notifies(timeout=0))
            except psycopg.OperationalError as exc:
                self.close()
                raise DatabaseUnreachableError(
                    f"lost the config DB at {self.endpoint}: {_cause(exc)}",
                    "check that PostgreSQL is running; farmkeys reconnects by itself",
                ) from exc

    def _used(self) -> None:
        """Another thread's statement may have taken notifications into the backlog."""
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):  # full (a wake-up is pending) or closed
                os.write(self._wake_w, b"!")

    def _execute(
        self, cur: psycopg.Cursor[dict[str, Any]], query: str, params: Params | None = None
    ) -> None:
        self.statements += 1
        try:
            cur.execute(query, params)
        except pgerrors.UndefinedTable as exc:
            raise self._no_farm() from exc
        except pgerrors.UndefinedColumn as exc:
            raise DatabaseError(
                f"the config DB at {self.endpoint} has an older schema than this farmkeys"
                f" needs ({_cause(exc)})",
                "run `farmkeys db upgrade` once (from any node)",
            ) from exc
        except psycopg.OperationalError as exc:
            self.close()
            raise DatabaseUnreachableError(
                f"lost the config DB at {self.endpoint}: {_cause(exc)}",
                "check that PostgreSQL is running; the operation can be run again",
            ) from exc
        except psycopg.Error as exc:
            raise DatabaseError(
                f"the config DB at {self.endpoint} failed a statement: {_cause(exc)}",
                "check the server's log; if the schema is old, run `farmkeys db upgrade`",
            ) from exc

    def fetch(self, query: str, params: Params | None = None) -> list[dict[str, Any]]:
        """Run one statement and return its rows, reconnecting once if the connection was lost."""
        with self._lock:
            try:
                for attempt in (1, 2):
                    conn = self._connection()
                    try:
                        with conn.cursor() as cur:
                            self._execute(cur, query, params)
                            return cur.fetchall() if cur.description else []
                    except DatabaseError:
                        if attempt == 2 or self._conn is not None:
                            raise
                        log.warning("config DB %s: connection lost; reconnecting", self.endpoint)
            finally:
                self._used()
        raise AssertionError("unreachable")

    @contextmanager
    def _transaction(self, make: Callable[[Connection, Cursor], S]) -> Iterator[S]:
        """One transaction, whose statements ``make`` wraps: everything in it commits
        together or not at all. The connection is this thread's until it ends."""
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    yield make(self, cur)
            except psycopg.OperationalError as exc:
                self.close()
                raise DatabaseUnreachableError(
                    f"lost the config DB at {self.endpoint} during a transaction: {_cause(exc)}",
                    "nothing was changed; run the operation again",
                ) from exc
            finally:
                self._used()

    def _no_farm(self) -> NotInitialisedError:
        return NotInitialisedError(
            f"the config DB at {self.endpoint} holds no farmkeys farm",
            "run `farmkeys init` once for the farm",
        )


class Statements:
    """The statements of one open transaction of a :class:`Connection`; the queries of
    each table add their own methods (:class:`farmkeys.db.Transaction`)."""

    def __init__(self, db: Connection, cur: Cursor) -> None:
        self._db = db
        self._cur = cur

    def execute(self, query: str, params: Params | None = None) -> list[dict[str, Any]]:
        self._db._execute(self._cur, query, params)
        return self._cur.fetchall() if self._cur.description else []

    def notify(self, channel: str, payload: str = "") -> None:
        """Wake the listeners of ``channel`` when this transaction commits."""
        self.execute("SELECT pg_notify(%s, %s)", (channel, payload))
