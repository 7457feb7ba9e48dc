"""Streaming replication of the lab's PostgreSQL: a standby of a running server, promoted
when a test fails the config DB over to it, and a DSN naming both."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo

from farmkeys_lab.postgres.cluster import (
    BASEBACKUP_TIMEOUT_SECONDS,
    START_TIMEOUT_SECONDS,
    SUPERUSER,
    Cluster,
    PostgresError,
    check_name,
    find_bindir,
    write_private,
)
from farmkeys_lab.servers import LOOPBACK

log = logging.getLogger(__name__)


class LocalPostgres(Cluster):
    """A disposable PostgreSQL on ``127.0.0.1:<port>`` that can make a streaming standby of
    itself (:meth:`standby`), and, as a standby, be promoted (:meth:`promote`)."""

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
        self._check_standby(name, synchronous=synchronous)
        standby = LocalPostgres(
            workdir, max_connections=self.max_connections, settings=self.settings
        )
        standby.workdir.mkdir(parents=True, exist_ok=True)
        write_private(standby.passfile, self.passfile.read_text())
        try:
            self._base_backup_into(standby, name)
            self._start_streaming(standby, name, synchronous=synchronous)
        except BaseException:
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

    def _check_standby(self, name: str, *, synchronous: bool) -> None:
        """Refuse a standby this server cannot have: a bad name, a stopped primary, or
        synchronous settings fixed on its command line."""
        check_name(name, what="standby name")
        if not self.running:
            raise PostgresError("the primary must run to make a standby of it")
        overridden = {"synchronous_standby_names", "synchronous_commit"} & set(self.settings)
        if synchronous and overridden:
            raise PostgresError(
                f"settings= fixes {', '.join(sorted(overridden))} on the command line, "
                "where ALTER SYSTEM cannot make the primary wait for its standby"
            )

    def _base_backup_into(self, standby: LocalPostgres, name: str) -> None:
        """``pg_basebackup -R -X stream`` of this server as ``standby``'s data, made as its
        account, connecting back under ``application_name`` ``name``."""
        bindir = find_bindir()
        assert bindir is not None  # the primary runs
        parent, data = standby._data_folder()
        # The standby's server reads the password from a passfile it can open.
        passfile = parent / "replication.pgpass"
        write_private(passfile, self.passfile.read_text())
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

    def _start_streaming(self, standby: LocalPostgres, name: str, *, synchronous: bool) -> None:
        """Start ``standby`` and wait until this server shows it streaming; with
        ``synchronous``, make this server wait for it first (undone if that fails)."""
        configured = False
        try:
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
            raise

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
