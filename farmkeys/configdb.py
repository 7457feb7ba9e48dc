"""The config DB: one shared PostgreSQL database, reached with psycopg 3.

It holds the farm (its name and DKM group), the certificate rows (public
certificate, role, dates, and the private key only as a sealed blob), and
what each node last installed. Migrations are the numbered plain-SQL files of
``sql/``, applied in order and recorded in ``farmkeys_migration``.

Connecting is retried with backoff for transient failures; a refused login
(wrong password, unknown role or database) fails at once. Every error names
the endpoint as ``host:port/dbname as user``, never the password.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import threading
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Self

import psycopg
from psycopg import Notify
from psycopg import errors as pgerrors
from psycopg.abc import Params
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from farmkeys._retry import RetryExhaustedError, call_with_retry
from farmkeys.config import DatabaseConfig, RetryConfig
from farmkeys.errors import DatabaseError, NotInitialisedError

log = logging.getLogger(__name__)

MIGRATION_TABLE = "farmkeys_migration"
# NOTIFY channels: the live set changed; a rollover was requested.
CHANGED_CHANNEL = "farmkeys_changed"
REQUEST_CHANNEL = "farmkeys_request"
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# Serialises migrations and `init` across every node that runs them at once.
_ADVISORY_LOCK = 0x666B_6579  # "fkey"

# FATAL errors at connect time that pass: the server is starting, stopping or full.
_TRANSIENT_FATAL = (
    "starting up",
    "shutting down",
    "in recovery mode",
    "too many clients",
    "remaining connection slots",
)


@dataclass(frozen=True)
class Farm:
    name: str
    dkm_group: uuid.UUID
    dkm_container: str
    schema_version: int


@dataclass(frozen=True)
class NewCertificate:
    """A certificate row about to be inserted."""

    id: uuid.UUID
    purpose: str
    role: str
    thumbprint: str
    sha256: str
    subject: str
    key_type: str
    not_before: datetime
    not_after: datetime
    der: bytes
    master_key: uuid.UUID
    blob: bytes


@dataclass(frozen=True)
class CertificateRow(NewCertificate):
    """A certificate row as stored, with the times the database keeps."""

    created_at: datetime
    role_since: datetime

    @property
    def identity(self) -> tuple[str, str, str]:
        return (self.purpose, self.role, self.thumbprint)


@dataclass(frozen=True)
class NodeRow:
    id: str
    last_sync: datetime | None
    last_seen: datetime
    generation: int | None
    installed: tuple[tuple[str, str, str], ...]
    last_error: str | None
    heartbeat_at: datetime | None = None
    directory_error: str | None = None
    hook_error: str | None = None
    master_keys: tuple[uuid.UUID, ...] = ()
    directory_server: str | None = None
    state_version: int | None = None


@dataclass(frozen=True)
class MasterKeyRow:
    """What the config DB records about one master key: never its bytes."""

    id: uuid.UUID
    state: str  # pending, current, previous, deleted
    created_at: datetime
    current_since: datetime | None
    replaced_at: datetime | None
    unused_since: datetime | None
    delete_now: bool
    deleted_at: datetime | None
    urgent: bool
    request: int | None
    reason: str


@dataclass(frozen=True)
class StoredState:
    """The farm state record as the config DB holds it: not trusted until verified
    (:func:`farmkeys.farmstate.verify`)."""

    body: bytes
    mac: bytes
    version: int


@dataclass(frozen=True)
class FetchRow:
    """A relying party was served ``thumbprint`` among its signing keys (publish.py)."""

    relying_party: str
    thumbprint: str
    first_fetched_at: datetime
    last_fetched_at: datetime
    node: str
    document: str
    mac: bytes | None = None  # by the node that served it (farmkeys.fetch_record)
    mac_key: uuid.UUID | None = None


_FETCHES = (
    "SELECT relying_party, thumbprint, first_fetched_at, last_fetched_at, node, document,"
    " mac, mac_key"
    " FROM relying_party_fetch ORDER BY relying_party, thumbprint"
)


@dataclass(frozen=True)
class LiveSet:
    """What a sync reads in one round trip: the farm, its live rows, the farm state record,
    and what this node last proved it can open.

    A row whose ``blob`` is empty had it withheld: the node holds that certificate intact
    and has opened a blob under its master key before. ``recorded``: the node's claim
    matched the live set and its own row, and the read recorded the sync
    (:meth:`ConfigDB.live_set`)."""

    farm: Farm
    rows: list[CertificateRow]
    confirmed_keys: frozenset[uuid.UUID]
    state: StoredState | None = None
    recorded: bool = False


@dataclass(frozen=True)
class Claim:
    """What a node's store holds, sent with the read of the live set: when the live set
    is still exactly this, the same statement records the sync."""

    generation: int
    installed: frozenset[tuple[str, str, str]]
    state_version: int | None


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The migrations shipped with this farmkeys, in order."""
    found = []
    for entry in _migration_files():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    return found


def _migration_files() -> list[Path]:
    """The shipped migrations: the package farmkeys._sql, as installed (an editable install
    maps it to the repository's sql/). Only a checkout run without installing, recognised
    by its pyproject.toml, reads sql/ beside the package: never a folder that merely
    happens to lie next to an installed farmkeys (another package's sql/)."""
    try:
        packaged = resources.files("farmkeys._sql")
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parent.parent
        if not (root / "pyproject.toml").is_file():
            raise
        return sorted((root / "sql").iterdir())
    return sorted(Path(str(p)) for p in packaged.iterdir())


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


class ConfigDB:
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
            raise DatabaseError(
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
                raise DatabaseError(
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
            raise DatabaseError(
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
    def transaction(self) -> Iterator[Transaction]:
        """One transaction: everything in it commits together or not at all. The
        connection is this thread's until it ends."""
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction(), conn.cursor() as cur:
                    yield Transaction(self, cur)
            except psycopg.OperationalError as exc:
                self.close()
                raise DatabaseError(
                    f"lost the config DB at {self.endpoint} during a transaction: {_cause(exc)}",
                    "nothing was changed; run the operation again",
                ) from exc
            finally:
                self._used()

    # -- migrations -----------------------------------------------------------

    def applied_migrations(self) -> set[int]:
        exists = self.fetch("SELECT to_regclass(%s) IS NOT NULL AS ok", (MIGRATION_TABLE,))
        if not exists[0]["ok"]:
            return set()
        return {r["version"] for r in self.fetch("SELECT version FROM farmkeys_migration")}

    def upgrade(self) -> list[str]:
        """Apply the migrations not yet applied, each in its own transaction; their names."""
        applied: list[str] = []
        self.fetch("SELECT pg_advisory_lock(%s)", (_ADVISORY_LOCK,))
        try:
            self.fetch(
                "CREATE TABLE IF NOT EXISTS farmkeys_migration ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = self.applied_migrations()
            known = migrations()
            newest = max((m.version for m in known), default=0)
            if done and max(done) > newest:
                raise DatabaseError(
                    f"the config DB at {self.endpoint} is at schema version {max(done)}, "
                    f"newer than this farmkeys knows ({newest})",
                    "upgrade farmkeys on this node",
                )
            for migration in known:
                if migration.version in done:
                    continue
                with self.transaction() as tx:
                    tx.execute(migration.sql)
                    tx.execute(
                        "INSERT INTO farmkeys_migration (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
                log.info("config DB %s: applied migration %s", self.endpoint, migration.name)
                applied.append(migration.name)
        finally:
            if self._conn is not None:
                self.fetch("SELECT pg_advisory_unlock(%s)", (_ADVISORY_LOCK,))
        return applied

    @contextmanager
    def init_lock(self) -> Iterator[None]:
        """Hold the farm-wide advisory lock that serialises `init` across nodes."""
        self.fetch("SELECT pg_advisory_lock(%s)", (_ADVISORY_LOCK,))
        try:
            yield
        finally:
            if self._conn is not None:
                self.fetch("SELECT pg_advisory_unlock(%s)", (_ADVISORY_LOCK,))

    # -- reads ----------------------------------------------------------------

    def farm(self) -> Farm | None:
        rows = self.fetch(
            "SELECT name, dkm_group, dkm_container,"
            " (SELECT max(version) FROM farmkeys_migration) AS schema_version FROM farm"
        )
        return _farm(rows[0]) if rows else None

    def _no_farm(self) -> NotInitialisedError:
        return NotInitialisedError(
            f"the config DB at {self.endpoint} holds no farmkeys farm",
            "run `farmkeys init` once for the farm",
        )

    def require_farm(self) -> Farm:
        """The farm, at the schema this farmkeys needs; raises when there is none."""
        farm = self.farm()
        if farm is None:
            raise self._no_farm()
        self.require_current_schema(farm)
        return farm

    def require_current_schema(self, farm: Farm) -> None:
        """Refuse to go on with a schema older than this farmkeys needs."""
        newest = max(m.version for m in migrations())
        if farm.schema_version < newest:
            raise DatabaseError(
                f"the config DB at {self.endpoint} is at schema version {farm.schema_version};"
                f" this farmkeys needs {newest}",
                "run `farmkeys db upgrade` once",
            )

    def live_set(
        self, node_id: str, *, claim: Claim | None = None, have: Collection[str] = ()
    ) -> LiveSet:
        """The farm, its live (not archived) certificates, the farm state record and the
        master keys ``node_id`` last confirmed, in one statement.

        ``have``: thumbprints the node's store holds intact; their blobs are withheld
        unless sealed under a master key the node has not confirmed. ``claim``: what the
        store holds; when the live set, the farm state version and the node's own row all
        still say exactly that, the same statement records the sync (``recorded``), so a
        sync that finds nothing changed costs one round trip."""
        doc = None if claim is None else _installed_doc(claim.installed)
        rows = self.fetch(
            _LIVE_SET,
            {
                "node": node_id,
                "claimed": claim is not None,
                "gen": None if claim is None else claim.generation,
                "doc": doc,
                "sv": None if claim is None else claim.state_version,
                "have": sorted(have),
            },
        )
        if not rows:
            raise self._no_farm()
        live = [r for r in rows if r["id"] is not None]
        return LiveSet(
            farm=_farm(rows[0]),
            rows=[_certificate(r) for r in live],
            confirmed_keys=frozenset(rows[0]["confirmed_keys"] or ()),
            state=_stored_state(rows[0]),
            recorded=bool(rows[0]["recorded"]),
        )

    def stored_state(self) -> StoredState | None:
        """The farm state record, or None when the config DB has none."""
        rows = self.fetch(_STORED_STATE)
        return _stored_state(rows[0]) if rows else None

    def master_keys(self) -> list[MasterKeyRow]:
        """Every master key the farm has recorded, oldest first."""
        return [_master_key(r) for r in self.fetch(_MASTER_KEYS)]

    def certificates(self, *, include_archived: bool = True) -> list[CertificateRow]:
        rows = self.fetch(
            "SELECT * FROM certificate WHERE %s OR role <> 'archived'"
            " ORDER BY purpose, not_after, id",
            (include_archived,),
        )
        return [_certificate(r) for r in rows]

    def nodes(self) -> list[NodeRow]:
        rows = self.fetch("SELECT * FROM node ORDER BY id")
        return [
            NodeRow(
                id=r["id"],
                last_sync=r["last_sync"],
                last_seen=r["last_seen"],
                generation=r["generation"],
                installed=tuple((i["purpose"], i["role"], i["thumbprint"]) for i in r["installed"]),
                last_error=r["last_error"],
                heartbeat_at=r.get("heartbeat_at"),
                directory_error=r.get("directory_error"),
                directory_server=r.get("directory_server"),
                hook_error=r.get("hook_error"),
                master_keys=tuple(sorted(r.get("master_keys") or (), key=str)),
                state_version=r.get("state_version"),
            )
            for r in rows
        ]

    def node_documents(
        self, live: Collection[tuple[str, str, str]], *, silent_after_seconds: float
    ) -> list[dict[str, Any]]:
        """Every node as `status --json` shows it, built by the server in one statement
        (a farm of a thousand nodes costs milliseconds, not a Python loop over rows):
        ``id``, ``last_sync``, ``last_seen``, ``generation``, ``installed`` (thumbprints
        by purpose and role), ``in_sync`` (exactly ``live`` installed), ``last_error``,
        ``heartbeat_at``, ``directory_error``, ``directory_server``, ``hook_error``,
        ``master_keys``, ``state_version``; and ``silent``, whether its heartbeat is older
        than ``silent_after_seconds`` by the server's clock. Times are ISO 8601 in UTC."""
        rows = self.fetch(
            "SELECT coalesce(json_agg(json_build_object("
            " 'id', n.id, 'last_sync', n.last_sync, 'last_seen', n.last_seen,"
            " 'generation', n.generation,"
            # record_sync stores both arrays sorted (by purpose, role, thumbprint; by id).
            " 'installed', jsonb_path_query_array(n.installed, '$[*].thumbprint'),"
            " 'in_sync', n.installed @> %(live)s::jsonb AND n.installed <@ %(live)s::jsonb,"
            " 'last_error', n.last_error, 'heartbeat_at', n.heartbeat_at,"
            " 'directory_error', n.directory_error, 'directory_server', n.directory_server,"
            " 'hook_error', n.hook_error, 'master_keys', to_json(n.master_keys),"
            " 'state_version', n.state_version,"
            " 'silent', n.heartbeat_at IS NOT NULL"
            "  AND now() - n.heartbeat_at > make_interval(secs => %(silent)s))"
            " ORDER BY n.id COLLATE \"C\"), '[]') AS nodes FROM node n",
            {"live": _installed_doc(live), "silent": silent_after_seconds},
        )
        return list(rows[0]["nodes"])

    # -- writes ---------------------------------------------------------------

    def record_sync(
        self,
        node_id: str,
        *,
        generation: int,
        installed: Sequence[tuple[str, str, str]],
        master_keys: Sequence[uuid.UUID] = (),
        directory_server: str | None = None,
        state_version: int | None = None,
        revoked: Collection[str] = (),
    ) -> None:
        """Record that ``node_id`` now has ``installed`` in its store, and opened the live
        blobs with ``master_keys``; ``directory_server`` is the directory server it last
        bound to (None: it did not need the directory this time); ``state_version`` the
        highest farm state version its store has installed; ``revoked`` the thumbprints
        it remembers as urgently replaced (shown by `repair-state`, never acted on)."""
        doc = _installed_doc(installed)
        self.fetch(
            "INSERT INTO node (id, last_sync, last_seen, generation, installed, last_error,"
            " master_keys, directory_server, state_version, revoked)"
            " VALUES (%(id)s, now(), now(), %(gen)s, %(doc)s, NULL, %(keys)s, %(dc)s, %(sv)s,"
            " %(revoked)s)"
            " ON CONFLICT (id) DO UPDATE SET last_sync = now(), last_seen = now(),"
            " generation = EXCLUDED.generation, installed = EXCLUDED.installed, last_error = NULL,"
            " master_keys = EXCLUDED.master_keys,"
            " directory_server = COALESCE(EXCLUDED.directory_server, node.directory_server),"
            " state_version = COALESCE(EXCLUDED.state_version, node.state_version),"
            " revoked = EXCLUDED.revoked",
            {
                "revoked": sorted(revoked),
                "id": node_id,
                "gen": generation,
                "doc": doc,
                "keys": sorted(master_keys, key=str),
                "dc": directory_server,
                "sv": state_version,
            },
        )

    def heartbeat(
        self, node_id: str, *, directory_error: str | None, directory_server: str | None = None
    ) -> None:
        """`serve` is alive on ``node_id``; and how, and where, it last saw the directory."""
        self.fetch(
            "INSERT INTO node (id, last_seen, heartbeat_at, directory_error, directory_server)"
            " VALUES (%s, now(), now(), %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET last_seen = now(), heartbeat_at = now(),"
            " directory_error = EXCLUDED.directory_error,"
            " directory_server = COALESCE(EXCLUDED.directory_server, node.directory_server)",
            (node_id, directory_error, directory_server),
        )

    def stopped_serving(self, node_id: str) -> None:
        """`serve` stopped cleanly on ``node_id``: no heartbeat is owed any more."""
        self.fetch("UPDATE node SET heartbeat_at = NULL WHERE id = %s", (node_id,))

    def record_hook(self, node_id: str, *, error: str | None) -> None:
        """The outcome of the on_change hook: ``error`` is None when it succeeded."""
        self.fetch(
            "UPDATE node SET hook_error = %s, hook_at = now() WHERE id = %s", (error, node_id)
        )

    def events(self, *, since: datetime | None = None) -> list[dict[str, Any]]:
        """The audit log, oldest first."""
        return self.fetch(
            "SELECT id, at, node, term, action, purpose, certificate, thumbprint, master_key,"
            " detail"
            " FROM audit_event WHERE %(since)s::timestamptz IS NULL OR at >= %(since)s"
            " ORDER BY at, id",
            {"since": since},
        )

    def record_fetch(
        self,
        relying_party: str,
        *,
        node_id: str,
        document: str,
        thumbprints: Sequence[str],
        macs: Sequence[bytes | None] | None = None,
        mac_key: uuid.UUID | None = None,
    ) -> None:
        """``relying_party`` fetched ``document`` (metadata or jwks) from ``node_id``, which
        served it these signing thumbprints; ``macs``: each one's fetch MAC under master
        key ``mac_key`` (:mod:`farmkeys.fetch_record`). A thumbprint it had never fetched
        wakes the leader (a promotion may have waited for it: ``policy.require_fetch``)."""
        marks = list(macs) if macs is not None else [None] * len(thumbprints)
        self.fetch(
            "WITH upserted AS ("
            " INSERT INTO relying_party_fetch (relying_party, thumbprint, node, document, mac,"
            " mac_key)"
            " SELECT %(rp)s, t, %(node)s, %(doc)s, m, %(key)s::uuid"
            " FROM unnest(%(thumbprints)s::text[], %(macs)s::bytea[]) AS u(t, m)"
            " ON CONFLICT (relying_party, thumbprint) DO UPDATE SET last_fetched_at = now(),"
            " node = EXCLUDED.node, document = EXCLUDED.document,"
            " mac = coalesce(EXCLUDED.mac, relying_party_fetch.mac),"
            " mac_key = CASE WHEN EXCLUDED.mac IS NULL THEN relying_party_fetch.mac_key"
            " ELSE EXCLUDED.mac_key END"
            " RETURNING (xmax = 0) AS inserted)"
            " SELECT pg_notify(%(channel)s, 'fetch') FROM upserted WHERE inserted LIMIT 1",
            {
                "channel": REQUEST_CHANNEL,
                "rp": relying_party,
                "node": node_id,
                "doc": document,
                "thumbprints": list(thumbprints),
                "macs": marks,
                "key": mac_key,
            },
        )

    def fetches(self) -> list[FetchRow]:
        """Every recorded relying-party fetch, by relying party and thumbprint."""
        return [FetchRow(**r) for r in self.fetch(_FETCHES)]

    def file_request(
        self,
        *,
        node_id: str,
        purpose: str | None,
        urgent: bool,
        master_key: bool = False,
        repair_state: bool = False,
        import_: tuple[uuid.UUID, bytes, str, str] | None = None,
        sign: Callable[[int, datetime], tuple[bytes, bytes]],
    ) -> int:
        """Queue a request for the leader and wake it; the request's id.

        ``sign(id, now)`` makes the request's body and MAC (:mod:`farmkeys.requests`) once
        the row has its id, with the config DB's clock; both are written in the same
        transaction, so the leader never sees the row unsigned. ``import_``: the
        certificate id, sealed blob, role and source of `import adfs`."""
        cert, blob, role, source = import_ if import_ is not None else (None, None, None, None)
        with self.transaction() as tx:
            rows = tx.execute(
                "INSERT INTO rollover_request (requested_by, purpose, urgent, master_key,"
                " repair_state, import_certificate, import_blob, import_role, import_source)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id, now() AS now",
                (node_id, purpose, urgent, master_key, repair_state, cert, blob, role, source),
            )
            request_id = int(rows[0]["id"])
            body, mac = sign(request_id, rows[0]["now"])
            tx.execute(
                "UPDATE rollover_request SET body = %s, mac = %s WHERE id = %s",
                (body, mac, request_id),
            )
            tx.notify(REQUEST_CHANNEL, str(request_id))
        return request_id

    def rollover_request(self, request_id: int) -> dict[str, Any]:
        return self.fetch("SELECT * FROM rollover_request WHERE id = %s", (request_id,))[0]

    def record_sync_error(self, node_id: str, message: str) -> None:
        """Record a failed sync's one-line error, so `status` can show it."""
        self.fetch(
            "INSERT INTO node (id, last_seen, last_error) VALUES (%s, now(), %s)"
            " ON CONFLICT (id) DO UPDATE SET last_seen = now(), last_error = EXCLUDED.last_error",
            (node_id, message),
        )


class Transaction:
    """Statements inside one open transaction of a :class:`ConfigDB`."""

    def live_certificates(self) -> list[CertificateRow]:
        """The live rows, locked until the transaction ends."""
        rows = self.execute(
            "SELECT * FROM certificate WHERE role <> 'archived'"
            " ORDER BY purpose, not_after, id FOR UPDATE"
        )
        return [_certificate(r) for r in rows]

    def set_role(self, certificate_id: uuid.UUID, role: str) -> None:
        self.execute(
            "UPDATE certificate SET role = %s, role_since = now() WHERE id = %s",
            (role, certificate_id),
        )

    def audit(
        self,
        *,
        node: str,
        term: int | None,
        action: str,
        purpose: str | None = None,
        certificate: uuid.UUID | None = None,
        thumbprint: str | None = None,
        master_key: uuid.UUID | None = None,
        detail: str = "",
    ) -> None:
        self.execute(
            "INSERT INTO audit_event (node, term, action, purpose, certificate, thumbprint,"
            " master_key, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (node, term, action, purpose, certificate, thumbprint, master_key, detail),
        )

    def master_keys(self) -> list[MasterKeyRow]:
        """Every recorded master key, locked until the transaction ends."""
        return [_master_key(r) for r in self.execute(_MASTER_KEYS + " FOR UPDATE")]

    def record_master_key(
        self,
        key_id: uuid.UUID,
        *,
        state: str,
        created_at: datetime | None = None,
        urgent: bool = False,
        request: int | None = None,
        reason: str = "",
    ) -> None:
        """Record a master key: a new ``pending`` one, or one found in the directory."""
        self.execute(
            "INSERT INTO master_key (id, state, created_at, current_since, urgent, request,"
            " reason) VALUES (%(id)s, %(state)s, coalesce(%(created)s, now()),"
            " CASE WHEN %(state)s = 'current' THEN now() END, %(urgent)s, %(request)s,"
            " %(reason)s)",
            {
                "id": key_id,
                "state": state,
                "created": created_at,
                "urgent": urgent,
                "request": request,
                "reason": reason,
            },
        )

    def set_blob(self, certificate_id: uuid.UUID, *, master_key: uuid.UUID, blob: bytes) -> None:
        """Replace a certificate's blob by the same PKCS#12 sealed under another master key."""
        self.execute(
            "UPDATE certificate SET blob = %s, master_key = %s WHERE id = %s",
            (blob, master_key, certificate_id),
        )

    def fetches(self) -> list[FetchRow]:
        """Every recorded relying-party fetch (read inside this transaction)."""
        return [FetchRow(**r) for r in self.execute(_FETCHES)]

    def stored_state(self) -> StoredState | None:
        """The farm state record, locked until the transaction ends."""
        rows = self.execute(_STORED_STATE + " FOR UPDATE")
        return _stored_state(rows[0]) if rows else None

    def write_state(self, *, body: bytes, mac: bytes, version: int, term: int | None) -> None:
        """Replace the farm state record (the caller made ``body`` and its ``mac``)."""
        self.execute(
            "INSERT INTO farm_state (singleton, version, body, mac, term)"
            " VALUES (true, %(version)s, %(body)s, %(mac)s, %(term)s)"
            " ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version,"
            " body = EXCLUDED.body, mac = EXCLUDED.mac, term = EXCLUDED.term,"
            " written_at = now()",
            {"version": version, "body": body, "mac": mac, "term": term},
        )

    def notify(self, channel: str, payload: str = "") -> None:
        """Wake the listeners of ``channel`` when this transaction commits."""
        self.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def __init__(self, db: ConfigDB, cur: psycopg.Cursor[dict[str, Any]]) -> None:
        self._db = db
        self._cur = cur

    def execute(self, query: str, params: Params | None = None) -> list[dict[str, Any]]:
        self._db._execute(self._cur, query, params)
        return self._cur.fetchall() if self._cur.description else []

    def create_farm(self, *, name: str, dkm_group: uuid.UUID, dkm_container: str) -> None:
        self.execute(
            "INSERT INTO farm (name, dkm_group, dkm_container) VALUES (%s, %s, %s)",
            (name, dkm_group, dkm_container),
        )

    def insert_certificate(self, row: NewCertificate) -> None:
        self.execute(
            "INSERT INTO certificate (id, purpose, role, thumbprint, sha256, subject, key_type,"
            " not_before, not_after, der, master_key, blob)"
            " VALUES (%(id)s, %(purpose)s, %(role)s, %(thumbprint)s, %(sha256)s, %(subject)s,"
            " %(key_type)s, %(not_before)s, %(not_after)s, %(der)s, %(master_key)s, %(blob)s)",
            row.__dict__,
        )


def _farm(row: dict[str, Any]) -> Farm:
    return Farm(
        name=row["name"],
        dkm_group=row["dkm_group"],
        dkm_container=row["dkm_container"],
        schema_version=row["schema_version"] or 0,
    )


_MASTER_KEYS = (
    "SELECT id, state, created_at, current_since, replaced_at, unused_since, delete_now,"
    " deleted_at, urgent, request, reason FROM master_key ORDER BY created_at, id"
)


_STORED_STATE = (
    "SELECT body AS state_body, mac AS state_mac, version AS state_version FROM farm_state"
)


def _stored_state(row: dict[str, Any]) -> StoredState | None:
    if row.get("state_body") is None:
        return None
    return StoredState(
        body=bytes(row["state_body"]), mac=bytes(row["state_mac"]), version=row["state_version"]
    )


def _master_key(row: dict[str, Any]) -> MasterKeyRow:
    return MasterKeyRow(**row)


_CERTIFICATE_FIELDS = tuple(CertificateRow.__dataclass_fields__)

# The sync's one statement (ConfigDB.live_set). `claim` records the sync only when the node's
# store, its row and the live set all agree (jsonb arrays compared both ways as sets).
# The names interpolated are the dataclass's fields, never input.
_LIVE_SET = (
    "WITH live AS (SELECT coalesce(jsonb_agg(jsonb_build_object('purpose', purpose,"  # noqa: S608
    " 'role', role, 'thumbprint', thumbprint)), '[]') AS doc,"
    " coalesce(array_agg(DISTINCT master_key), '{}') AS keys"
    " FROM certificate WHERE role <> 'archived'),"
    " claim AS (UPDATE node SET last_sync = now(), last_seen = now(), last_error = NULL"
    " FROM live WHERE %(claimed)s AND node.id = %(node)s AND node.generation = %(gen)s"
    " AND node.installed @> %(doc)s::jsonb AND node.installed <@ %(doc)s::jsonb"
    " AND live.doc @> %(doc)s::jsonb AND live.doc <@ %(doc)s::jsonb"
    " AND node.master_keys @> live.keys"
    " AND node.state_version IS NOT DISTINCT FROM %(sv)s::bigint"
    " AND %(sv)s::bigint IS NOT DISTINCT FROM (SELECT version FROM farm_state)"
    " RETURNING 1)"
    " SELECT f.name, f.dkm_group, f.dkm_container,"
    " (SELECT max(version) FROM farmkeys_migration) AS schema_version,"
    " n.master_keys AS confirmed_keys, s.body AS state_body, s.mac AS state_mac,"
    " s.version AS state_version, (SELECT count(*) FROM claim) > 0 AS recorded, "
    + ", ".join(f"c.{name}" for name in _CERTIFICATE_FIELDS if name != "blob")
    + ", CASE WHEN c.thumbprint = ANY(%(have)s::text[])"
    " AND c.master_key = ANY(coalesce(n.master_keys, '{}')) THEN NULL ELSE c.blob END AS blob"
    " FROM farm f LEFT JOIN farm_state s ON true LEFT JOIN node n ON n.id = %(node)s"
    " LEFT JOIN certificate c ON c.role <> 'archived'"
    " ORDER BY c.purpose, c.role, c.not_after"
)


def _installed_doc(installed: Collection[tuple[str, str, str]]) -> Jsonb:
    """How the node row records an installed set: sorted objects of purpose, role, thumbprint."""
    return Jsonb([{"purpose": p, "role": r, "thumbprint": t} for p, r, t in sorted(installed)])


def _certificate(row: dict[str, Any]) -> CertificateRow:
    values = {name: row[name] for name in _CERTIFICATE_FIELDS}
    values["der"] = bytes(values["der"])
    values["blob"] = b"" if values["blob"] is None else bytes(values["blob"])
    values["thumbprint"] = values["thumbprint"].strip()
    return CertificateRow(**values)
