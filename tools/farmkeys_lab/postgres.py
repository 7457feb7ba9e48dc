"""A private PostgreSQL cluster on loopback, for the tests, the soak, the benchmarks and the demo.

:class:`LocalPostgres` runs ``initdb`` once in a folder of its own, then runs
the server (``postgres``, in the foreground, as a child process) on a free
port of 127.0.0.1 with Unix sockets turned off. It never touches a cluster
of the machine's own: no ``pg_ctlcluster``, no port 5432 unless it happens to
be free, no shared socket folder.

- Run as root, the server runs as an unprivileged account (``postgres`` when
  the machine has one, else ``nobody``), because PostgreSQL refuses to run as
  root. Its data folder is then a fresh ``/tmp/farmkeys-pg-*`` folder (0700,
  owned by that account), since the caller's folder (pytest's, say) is
  usually closed to other accounts; ``<workdir>/data`` is a symlink to it.
- The superuser ``postgres`` has a random password (SCRAM), kept in
  ``<workdir>/pgpass`` (0600) and handed to libpq as ``passfile=``, so
  connection strings carry no secret.
- ``stop()`` / ``start()`` (or ``restart()``) keep the data and the port, so a
  test can take the config DB away from running nodes and bring it back.
- ``standby()`` makes a streaming standby of a running server (``pg_basebackup``,
  by default synchronous: a commit returns once the standby applied it),
  ``promote()`` turns it into a primary, and :func:`multi_host_dsn` names both
  the way a config DB that fails over is configured.
- Durability is relaxed (``fsync = off``): a crash of the server loses
  nothing (the kernel keeps the writes), only a crash of the machine would.

Nothing here is meant for production.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
import psycopg.conninfo

from farmkeys_lab.servers import LOOPBACK, accepts, free_port, log_tail, stop_child

log = logging.getLogger(__name__)

SUPERUSER = "postgres"
# How long start() waits for the server to accept logins, and stop() for it to exit.
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
# How long pg_basebackup may take to copy a primary for standby().
BASEBACKUP_TIMEOUT_SECONDS = 300.0
# The accounts a root caller runs the server as, first one found.
RUN_AS_CANDIDATES = ("postgres", "nobody")
_VERSION_DIR = re.compile(r"[0-9]+")
_SAFE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresError(RuntimeError):
    """PostgreSQL is missing, or its server failed to start; the message carries its log."""


def find_bindir() -> Path | None:
    """The folder of ``initdb`` and ``postgres``: Debian's newest, ``pg_config``, or ``$PATH``."""
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = sorted(
            (p for p in debian.iterdir() if _VERSION_DIR.fullmatch(p.name)),
            key=lambda p: int(p.name),
            reverse=True,
        )
        for version in versions:
            if (version / "bin" / "initdb").is_file() and (version / "bin" / "postgres").is_file():
                return version / "bin"
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if found and (Path(found) / "initdb").is_file():
                return Path(found)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _run_as() -> pwd.struct_passwd | None:
    """The account to run the server as: None when not root (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in RUN_AS_CANDIDATES:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresError("running as root and the machine has neither a postgres nor a nobody user")


class LocalPostgres:
    """A disposable PostgreSQL on ``127.0.0.1:<port>``; the superuser's DSN is ``admin_dsn``."""

    def __init__(
        self,
        workdir: Path,
        *,
        max_connections: int = 100,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.max_connections = max_connections
        self.settings = dict(settings or {})
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._account = _run_as()
        self._data: Path | None = None
        self._private_parent: Path | None = None  # the /tmp folder made for a root caller

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LocalPostgres {LOOPBACK}:{self.port} {state}>"

    # -- what callers connect to ----------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process is not None else None

    @property
    def passfile(self) -> Path:
        return self.workdir / "pgpass"

    @property
    def log_path(self) -> Path:
        return self.workdir / "postgres.log"

    @property
    def admin_dsn(self) -> str:
        """The superuser's connection string to the ``postgres`` database (no secret in it)."""
        return self.dsn_for("postgres")

    def dsn_for(self, dbname: str, *, user: str = SUPERUSER) -> str:
        """A libpq connection string for ``dbname`` on this server; the password is in passfile."""
        return psycopg.conninfo.make_conninfo(
            host=LOOPBACK,
            port=str(self.port),
            user=user,
            dbname=dbname,
            passfile=str(self.passfile),
            connect_timeout="5",
        )

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` (lower-case letters, digits, _); its DSN."""
        _check_name(name)
        with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` if it exists, ending whatever sessions it has."""
        _check_name(name)
        with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Start the server (a no-op if it runs), creating the cluster on the first start."""
        if self.running:
            return
        bindir = find_bindir()
        if bindir is None:
            raise PostgresError(
                "PostgreSQL's initdb was not found (looked in /usr/lib/postgresql/*/bin, "
                "pg_config --bindir and $PATH) — install Debian's postgresql package"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._data is None:
            self._data = self._initdb(bindir)
        if self.port == 0:
            self.port = free_port()
        options = {
            "listen_addresses": LOOPBACK,
            "port": str(self.port),
            "unix_socket_directories": "",
            "max_connections": str(self.max_connections),
            "fsync": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
            "log_min_messages": "warning",
            **self.settings,
        }
        argv = [str(bindir / "postgres"), "-D", str(self._data)]
        for key, value in options.items():
            argv += ["-c", f"{key}={value}"]
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                cwd="/",
                **self._as_account(),
                start_new_session=True,  # a Ctrl-C of the caller's terminal is not its stop
            )
        self._wait_until_ready(offset)
        log.info("postgres %d listening on %s:%d", self._process.pid, LOOPBACK, self.port)

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server and wait: ``fast`` (SIGINT: sessions ended) or ``immediate`` (SIGQUIT).

        Data and port are kept for the next :meth:`start`.
        """
        process, self._process = self._process, None
        sig = signal.SIGQUIT if mode == "immediate" else signal.SIGINT
        stop_child(process, sig=sig, timeout=STOP_TIMEOUT_SECONDS, name="postgres")

    def restart(self, *, mode: str = "fast") -> None:
        """Stop, then start again on the same port with the same data."""
        self.stop(mode=mode)
        self.start()

    def remove(self) -> None:
        """Stop the server and delete its data."""
        self.stop()
        if self._private_parent is not None:
            shutil.rmtree(self._private_parent, ignore_errors=True)
            self._private_parent = None
            with contextlib.suppress(OSError):
                (self.workdir / "data").unlink()
        elif self._data is not None:
            shutil.rmtree(self._data, ignore_errors=True)
        self._data = None

    # -- replication ------------------------------------------------------------------

    def standby(
        self, workdir: Path, *, name: str = "standby", synchronous: bool = True
    ) -> LocalPostgres:
        """A streaming standby of this running server in ``workdir``, started on a port of its
        own; returns once it accepts logins and this server shows it streaming.

        Its data is ``pg_basebackup -R -X stream`` of this server, made as the same account
        (a root caller's standby, like :meth:`start`'s cluster, lives in a private /tmp
        folder), and it connects back as the superuser under ``application_name`` ``name``.
        Its ``passfile`` holds this server's line (``127.0.0.1:*:*:postgres:…``), so the
        password is the same on both. A database created here appears there.

        With ``synchronous``, this server is then set (``ALTER SYSTEM``) to
        ``synchronous_standby_names = '"<name>"'`` and ``synchronous_commit = remote_apply``:
        a commit returns only once the standby has applied it, so what a commit here
        acknowledged is readable on the standby at once and survives a failover to it. It
        also means a commit here waits while the standby is down or gone: after removing
        the standby, write nothing here (stopping is fine) unless both settings are
        ``ALTER SYSTEM RESET`` first. One synchronous standby at a time: a second one
        replaces the first in ``synchronous_standby_names``.
        """
        _check_name(name, what="standby name")
        if not self.running:
            raise PostgresError("the primary must run to make a standby of it")
        overridden = {"synchronous_standby_names", "synchronous_commit"} & set(self.settings)
        if synchronous and overridden:
            raise PostgresError(
                f"settings= fixes {', '.join(sorted(overridden))} on the command line, "
                "where ALTER SYSTEM cannot make the primary wait for its standby"
            )
        bindir = find_bindir()
        assert bindir is not None  # the primary runs
        standby = LocalPostgres(
            workdir, max_connections=self.max_connections, settings=self.settings
        )
        standby.workdir.mkdir(parents=True, exist_ok=True)
        _write_private(standby.passfile, self.passfile.read_text())
        configured = False
        try:
            parent, data = standby._data_folder()
            # The standby's server reads the password from a passfile it can open.
            passfile = parent / "replication.pgpass"
            _write_private(passfile, self.passfile.read_text())
            if standby._account is not None:
                os.chown(passfile, standby._account.pw_uid, standby._account.pw_gid)
            conninfo = psycopg.conninfo.make_conninfo(
                host=LOOPBACK,
                port=str(self.port),
                user=SUPERUSER,
                passfile=str(passfile),
                application_name=name,
            )
            argv = [str(bindir / "pg_basebackup"), "-D", str(data), "-R", "-X", "stream"]
            # A fast checkpoint: the default spreads it over minutes when there is much to write.
            argv += ["--checkpoint=fast", "--no-sync", "-d", conninfo]
            try:
                done = subprocess.run(
                    argv,
                    capture_output=True,
                    text=True,
                    cwd="/",
                    **standby._as_account(),
                    check=False,
                    timeout=BASEBACKUP_TIMEOUT_SECONDS,
                )
            except subprocess.TimeoutExpired as exc:
                raise PostgresError(
                    f"pg_basebackup of port {self.port} did not finish within "
                    f"{BASEBACKUP_TIMEOUT_SECONDS:.0f} s"
                ) from exc
            if done.returncode != 0:
                raise PostgresError(
                    f"pg_basebackup failed with status {done.returncode}:"
                    f" {(done.stderr or done.stdout).strip()[-2000:]}"
                )
            standby._data = data
            # -R wrote primary_conninfo (with application_name) there; a primary's own
            # synchronous settings it copied must not make the standby wait once promoted.
            with (data / "postgresql.auto.conf").open("a", encoding="utf-8") as conf:
                conf.write("synchronous_standby_names = ''\nsynchronous_commit = 'on'\n")
            with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
                if synchronous:
                    # Before the standby starts, so every process of the primary has reloaded
                    # by the time the standby streams (a commit then waits, never races it).
                    configured = True
                    admin.execute(f"ALTER SYSTEM SET synchronous_standby_names = '\"{name}\"'")
                    admin.execute("ALTER SYSTEM SET synchronous_commit = 'remote_apply'")
                    admin.execute("SELECT pg_reload_conf()")
                standby.start()
                standby._wait_until_streaming(admin, name, "sync" if synchronous else "async")
        except BaseException:
            if configured:
                self._reset_synchronous()
            standby.remove()
            raise
        log.info(
            "standby %s of %s:%d streams on %s:%d (%s)",
            name,
            LOOPBACK,
            self.port,
            LOOPBACK,
            standby.port,
            "synchronous" if synchronous else "asynchronous",
        )
        return standby

    def promote(self) -> None:
        """Promote this standby (``pg_ctl promote -w``, as the server's account); returns
        once ``pg_is_in_recovery()`` is false, i.e. it takes writes."""
        bindir = find_bindir()
        if bindir is None or self._data is None or not self.running:
            raise PostgresError("only a running standby can be promoted")
        wait = f"{START_TIMEOUT_SECONDS:.0f}"
        try:
            done = subprocess.run(
                [str(bindir / "pg_ctl"), "promote", "-D", str(self._data), "-w", "-t", wait],
                capture_output=True,
                text=True,
                cwd="/",
                **self._as_account(),
                check=False,
                timeout=START_TIMEOUT_SECONDS + 30,
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresError(f"pg_ctl promote of port {self.port} did not return") from exc
        if done.returncode != 0:
            raise PostgresError(
                f"pg_ctl promote of port {self.port} failed with status {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while self.in_recovery:
            if time.monotonic() > deadline:
                raise PostgresError(
                    f"the standby on port {self.port} is still in recovery "
                    f"{START_TIMEOUT_SECONDS:.0f} s after pg_ctl promote"
                )
            time.sleep(0.05)
        log.info("standby %s:%d promoted", LOOPBACK, self.port)

    @property
    def in_recovery(self) -> bool:
        """Whether this server is a standby (``pg_is_in_recovery()``)."""
        with psycopg.connect(self.admin_dsn) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        return bool(row and row[0])

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    # -- internals ----------------------------------------------------------------------

    def _wait_until_streaming(
        self, primary: psycopg.Connection[Any], name: str, wanted: str
    ) -> None:
        """Wait until ``primary`` shows this standby (``name``) streaming as ``wanted``."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        row: tuple[Any, ...] | None = None
        while row != ("streaming", wanted):
            if not self.running:
                raise PostgresError(
                    f"the standby {name} on port {self.port} exited; its log:\n{self._log_tail(0)}"
                )
            if time.monotonic() > deadline:
                raise PostgresError(
                    f"the standby {name} on port {self.port} does not stream as {wanted} "
                    f"within {START_TIMEOUT_SECONDS:.0f} s (pg_stat_replication: {row}); "
                    f"its log:\n{self._log_tail(0)}"
                )
            time.sleep(0.05)
            row = primary.execute(
                "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = %s",
                (name,),
            ).fetchone()

    def _reset_synchronous(self) -> None:
        """Undo :meth:`standby`'s settings here, so commits stop waiting for a standby."""
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(self.admin_dsn, autocommit=True) as admin,
        ):
            admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
            admin.execute("ALTER SYSTEM RESET synchronous_commit")
            admin.execute("SELECT pg_reload_conf()")

    def _data_folder(self) -> tuple[Path, Path]:
        """(a folder the server's account owns, the data folder to make in it)."""
        if self._account is None:
            return self.workdir, self.workdir / "data"
        parent = Path(tempfile.mkdtemp(prefix="farmkeys-pg-"))
        self._private_parent = parent
        os.chown(parent, self._account.pw_uid, self._account.pw_gid)
        data = parent / "data"
        link = self.workdir / "data"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(data)
        return parent, data

    def _initdb(self, bindir: Path) -> Path:
        password = secrets.token_urlsafe(24)
        _write_private(self.passfile, f"{LOOPBACK}:*:*:{SUPERUSER}:{password}\n")
        parent, data = self._data_folder()
        pwfile = parent / "initdb.pw"
        _write_private(pwfile, password + "\n")
        if self._account is not None:
            os.chown(pwfile, self._account.pw_uid, self._account.pw_gid)
        try:
            done = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "--pgdata",
                    str(data),
                    "--username",
                    SUPERUSER,
                    "--auth",
                    "scram-sha-256",
                    "--pwfile",
                    str(pwfile),
                    "--encoding",
                    "UTF8",
                    "--locale",
                    "C",
                    "--no-sync",
                    "--no-instructions",
                ],
                capture_output=True,
                text=True,
                cwd="/",
                **self._as_account(),
                check=False,
                timeout=120,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise PostgresError(
                f"initdb failed with status {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
        return data

    def _wait_until_ready(self, log_offset: int) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        last = "no answer"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise PostgresError(
                    f"postgres exited with status {code} before accepting logins on port "
                    f"{self.port}; its log:\n{self._log_tail(log_offset)}"
                )
            if accepts(self.port):
                try:
                    with psycopg.connect(self.admin_dsn, connect_timeout=2) as conn:
                        conn.execute("SELECT 1")
                    return
                except psycopg.OperationalError as exc:  # starting up, recovering
                    last = " ".join(str(exc).split())
            time.sleep(0.05)
        self.stop(mode="immediate")
        raise PostgresError(
            f"postgres did not accept logins on port {self.port} within "
            f"{START_TIMEOUT_SECONDS:.0f} s ({last}); its log:\n{self._log_tail(log_offset)}"
        )

    def _as_account(self) -> dict[str, Any]:
        """subprocess options that run initdb and the server as ``_account`` (none: as us)."""
        if self._account is None:
            return {}
        return {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}

    def _log_tail(self, offset: int) -> str:
        return log_tail(self.log_path, offset, empty="(no log)")


def _check_name(name: str, *, what: str = "database name") -> None:
    if not _SAFE_NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r}: use lower-case letters, digits and _")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def multi_host_dsn(servers: Sequence[LocalPostgres], dbname: str, *, user: str = SUPERUSER) -> str:
    """A libpq connection string that lists every server (``host=a,b port=p,q``) and takes
    the one that accepts writes (``target_session_attrs=read-write``), as a farm whose
    config DB fails over to its standby is configured. The passfile is the first server's
    (a standby's holds the same password)."""
    return psycopg.conninfo.make_conninfo(
        host=",".join(LOOPBACK for _ in servers),
        port=",".join(str(s.port) for s in servers),
        user=user,
        dbname=dbname,
        passfile=str(servers[0].passfile),
        target_session_attrs="read-write",
        connect_timeout="5",
    )
