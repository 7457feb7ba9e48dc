"""One private PostgreSQL server: ``initdb`` in a folder of its own, then ``postgres`` on a
free port of 127.0.0.1, as a child process; databases made and dropped in it.

See :mod:`farmkeys_lab.postgres` for what the lab's PostgreSQL guarantees.
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
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import psycopg
import psycopg.conninfo

from farmkeys_lab.servers import LOOPBACK, free_port, log_tail, stop_child, wait_until_serving

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


class Cluster:
    """A disposable PostgreSQL on ``127.0.0.1:<port>``; the superuser's DSN is ``admin_dsn``.

    :class:`~farmkeys_lab.postgres.LocalPostgres` adds streaming replication.
    """

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
        return f"<{type(self).__name__} {LOOPBACK}:{self.port} {state}>"

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
        check_name(name)
        with psycopg.connect(self.admin_dsn, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` if it exists, ending whatever sessions it has."""
        check_name(name)
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
        wait_until_serving(
            self._process,
            name="postgres",
            port=self.port,
            ready=f"accepting logins on port {self.port}",
            timeout=START_TIMEOUT_SECONDS,
            log_path=self.log_path,
            log_offset=offset,
            error=PostgresError,
            on_failure=lambda: self.stop(mode="immediate"),
            check=self._log_in,
            starting=(psycopg.OperationalError,),  # starting up, recovering
        )
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
        write_private(self.passfile, f"{LOOPBACK}:*:*:{SUPERUSER}:{password}\n")
        parent, data = self._data_folder()
        pwfile = parent / "initdb.pw"
        write_private(pwfile, password + "\n")
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

    def _log_in(self) -> None:
        with psycopg.connect(self.admin_dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")

    def _log_tail(self, offset: int) -> str:
        return log_tail(self.log_path, offset, empty="(no log)")

    def _as_account(self) -> dict[str, Any]:
        """subprocess options that run initdb and the server as ``_account`` (none: as us)."""
        if self._account is None:
            return {}
        return {"user": self._account.pw_uid, "group": self._account.pw_gid, "extra_groups": []}


def check_name(name: str, *, what: str = "database name") -> None:
    if not _SAFE_NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r}: use lower-case letters, digits and _")


def write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
