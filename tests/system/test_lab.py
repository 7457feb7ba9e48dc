"""The lab's private servers, and the lab an operator keeps running by hand.

PostgreSQL: its own cluster, closed to anyone without its password, and a
synchronous streaming standby of it that can be promoted. Samba: an
AD domain controller on 127.0.0.1 only, TLS verified with the lab's CA, the
service account delegated on the AD FS parent and nobody else. All three start
through one start-and-wait loop (farmkeys_lab.servers.wait_until_serving).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import ssl
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ldap3
import psycopg
import pytest
from farmtools import wait_until
from ldap3.core.exceptions import LDAPException, LDAPSocketOpenError
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from farmkeys_lab.postgres import LocalPostgres, multi_host_dsn
from farmkeys_lab.samba import (
    PORTS,
    LocalSambaDC,
    SambaError,
    SambaTemplate,
    sid_text,
    write_ca_certificate,
)
from farmkeys_lab.servers import free_port, wait_until_serving


def test_the_private_cluster_listens_on_loopback_and_runs_unprivileged(
    postgres: LocalPostgres,
) -> None:
    with psycopg.connect(postgres.admin_dsn) as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN"
                " ('listen_addresses', 'unix_socket_directories', 'port', 'data_directory')"
            ).fetchall()
        )
    assert settings["listen_addresses"] == "127.0.0.1"
    assert settings["unix_socket_directories"] == ""
    assert int(settings["port"]) == postgres.port != 5432
    data = os.stat(settings["data_directory"])
    assert stat.S_IMODE(data.st_mode) == 0o700
    assert postgres.pid is not None
    owner = os.stat(f"/proc/{postgres.pid}").st_uid
    if os.geteuid() == 0:
        assert owner != 0, "PostgreSQL must not run as root"
        assert data.st_uid == owner
    assert stat.S_IMODE(os.stat(postgres.passfile).st_mode) == 0o600


def test_a_login_without_the_password_is_refused(postgres: LocalPostgres) -> None:
    info = conninfo_to_dict(postgres.admin_dsn)
    info.pop("passfile")
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(make_conninfo(**{k: str(v) for k, v in info.items()}), passfile="/dev/null")
    wrong = make_conninfo(**{k: str(v) for k, v in info.items()}, password="not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong)


def test_a_restart_keeps_the_port_and_the_data(postgres: LocalPostgres, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
    port, pid = postgres.port, postgres.pid
    postgres.restart()
    assert postgres.port == port and postgres.pid != pid
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]


# -- PostgreSQL streaming standby ----------------------------------------------------------

# Generous: the tests share a 2-core machine with whatever else runs.
REPLICATION_WAIT_SECONDS = 120.0


def test_a_synchronous_standby_has_each_commit_at_once_and_refuses_writes(
    replicated: tuple[LocalPostgres, LocalPostgres],
) -> None:
    primary, standby = replicated
    assert standby.running and standby.port not in (0, primary.port, 5432)
    assert not primary.in_recovery and standby.in_recovery
    with psycopg.connect(primary.admin_dsn) as conn:
        shown = conn.execute(
            "SELECT application_name, state, sync_state FROM pg_stat_replication"
        ).fetchall()
    assert shown == [("standby", "streaming", "sync")]
    # Run like the primary: unprivileged, private data, the same password in a 0600 passfile.
    data = os.stat(standby.workdir / "data")
    assert stat.S_IMODE(data.st_mode) == 0o700
    assert standby.pid is not None
    if os.geteuid() == 0:
        owner = os.stat(f"/proc/{standby.pid}").st_uid
        assert owner != 0 and data.st_uid == owner
    assert standby.passfile.read_text() == primary.passfile.read_text()
    assert stat.S_IMODE(os.stat(standby.passfile).st_mode) == 0o600

    # A database created on the primary is on the standby as soon as CREATE DATABASE returns,
    # and so is every row whose commit returned.
    dsn = primary.create_database("replicated")
    with (
        psycopg.connect(dsn, autocommit=True) as writer,
        psycopg.connect(standby.dsn_for("replicated"), autocommit=True) as reader,
    ):
        writer.execute("CREATE TABLE kept (x int)")
        for x in range(1, 21):
            writer.execute("INSERT INTO kept VALUES (%s)", (x,))
            assert reader.execute("SELECT max(x) FROM kept").fetchone() == (x,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            reader.execute("INSERT INTO kept VALUES (0)")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            reader.execute("CREATE TABLE other (x int)")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (20,)


def test_while_the_synchronous_standby_is_down_a_commit_waits_for_it(
    replicated: tuple[LocalPostgres, LocalPostgres],
) -> None:
    primary, standby = replicated
    dsn = primary.create_database("replicated")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")
    standby.stop()
    with (
        psycopg.connect(dsn, autocommit=True) as writer,
        psycopg.connect(primary.admin_dsn, autocommit=True) as admin,
        ThreadPoolExecutor(1) as pool,
    ):
        pid = writer.info.backend_pid
        commit = pool.submit(writer.execute, "INSERT INTO kept VALUES (1)")
        try:
            wait_until(
                lambda: (
                    admin.execute(
                        "SELECT wait_event = 'SyncRep' FROM pg_stat_activity WHERE pid = %s", (pid,)
                    ).fetchone()
                    == (True,)
                ),
                REPLICATION_WAIT_SECONDS,
                "the commit waits for the standby (wait_event SyncRep)",
            )
            assert not commit.done()
            standby.start()  # it catches up, then the primary's commit returns
            commit.result(timeout=REPLICATION_WAIT_SECONDS)
        finally:
            if not commit.done():  # never leave the worker blocked in its commit
                admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
    with psycopg.connect(standby.dsn_for("replicated")) as conn:
        assert conn.execute("SELECT x FROM kept").fetchall() == [(1,)]


def test_after_a_failover_the_multi_host_dsn_reaches_the_promoted_standby(
    replicated: tuple[LocalPostgres, LocalPostgres],
) -> None:
    primary, standby = replicated
    primary.create_database("replicated")
    dsn = multi_host_dsn([primary, standby], "replicated")
    info = conninfo_to_dict(dsn)
    assert info["host"] == "127.0.0.1,127.0.0.1"
    assert info["port"] == f"{primary.port},{standby.port}"
    assert info["target_session_attrs"] == "read-write"
    assert info["passfile"] == str(primary.passfile)
    where = "SELECT inet_server_port(), pg_is_in_recovery()"
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute(where).fetchone() == (primary.port, False)
        conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")

    primary.stop(mode="fast")
    standby.promote()
    assert not standby.in_recovery
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute(where).fetchone() == (standby.port, False)
        assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]
        # It takes writes, and waits for no standby of its own.
        assert conn.execute("SHOW synchronous_standby_names").fetchone() == ("",)
        conn.execute("INSERT INTO kept VALUES (43)")
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (2,)

    # remove() leaves nothing behind (the fixture's second remove() is a no-op).
    folders = [(server.workdir / "data").resolve() for server in (primary, standby)]
    assert all(folder.is_dir() for folder in folders)
    standby.remove()
    primary.remove()
    assert not any(folder.exists() for folder in folders)
    assert not standby.running and not primary.running


# -- Samba AD DC -------------------------------------------------------------------------


def ldaps(
    dc: LocalSambaDC, user: str, password: str, ca_file: Path | None = None
) -> ldap3.Connection:
    """A bound ldaps connection, the server's certificate verified (never turned off)."""
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca_file or dc.ca_file))
    server = ldap3.Server(dc.url, use_ssl=True, tls=tls, get_info=ldap3.NONE, connect_timeout=5)
    return ldap3.Connection(server, user, password, auto_bind=True, raise_exceptions=True)


def own_sid(conn: ldap3.Connection, dn: str) -> str:
    conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["objectSid"])
    return sid_text(conn.response[0]["raw_attributes"]["objectSid"][0])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_the_template_records_what_the_tests_need_privately(samba_template: SambaTemplate) -> None:
    record = samba_template.record_path
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    stored = json.loads(record.read_text())
    assert stored["service_password"] == samba_template.service_password
    assert samba_template.base_dn == "DC=farmkeys,DC=lab"
    assert samba_template.service_upn == "svc-farm@farmkeys.lab"
    assert samba_template.adfs_parent == ("CN=ADFS,CN=Microsoft,CN=Program Data,DC=farmkeys,DC=lab")
    for sid in (samba_template.service_sid, samba_template.other_sid):
        assert sid.startswith(samba_template.domain_sid + "-")
    assert samba_template.service_sid != samba_template.other_sid
    key = samba_template.domain_dir / "private" / "tls" / "key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert samba_template.admin_password not in repr(samba_template)


def test_the_service_account_binds_over_ldaps_by_dn_and_by_upn(samba_dc: LocalSambaDC) -> None:
    for user in (samba_dc.service_dn, samba_dc.service_upn):
        with ldaps(samba_dc, user, samba_dc.service_password) as conn:
            assert conn.bound
            assert own_sid(conn, samba_dc.service_dn) == samba_dc.service_sid
    with pytest.raises(LDAPException, match="invalidCredentials"):
        ldaps(samba_dc, samba_dc.service_upn, "not-the-password")


def test_a_plain_simple_bind_on_389_is_refused(samba_dc: LocalSambaDC) -> None:
    server = ldap3.Server(samba_dc.ldap_url, get_info=ldap3.NONE, connect_timeout=5)
    conn = ldap3.Connection(server, samba_dc.service_dn, samba_dc.service_password)
    try:
        assert not conn.bind()
        assert conn.result["description"] == "strongerAuthRequired"
    finally:
        conn.unbind()


def test_starttls_on_389_then_a_bind_works(samba_dc: LocalSambaDC) -> None:
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(samba_dc.ca_file))
    server = ldap3.Server(samba_dc.ldap_url, tls=tls, get_info=ldap3.NONE, connect_timeout=5)
    conn = ldap3.Connection(server, samba_dc.service_upn, samba_dc.service_password)
    try:
        conn.open()
        assert conn.start_tls()
        assert conn.bind(), conn.result
        assert own_sid(conn, samba_dc.service_dn) == samba_dc.service_sid
    finally:
        conn.unbind()


def test_the_certificate_does_not_verify_against_another_ca(
    samba_dc: LocalSambaDC, tmp_path: Path
) -> None:
    other_ca = write_ca_certificate(tmp_path / "other-ca.pem")
    with pytest.raises(LDAPSocketOpenError, match="CERTIFICATE_VERIFY_FAILED"):
        ldaps(samba_dc, samba_dc.service_dn, samba_dc.service_password, ca_file=other_ca)
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(other_ca))
    server = ldap3.Server(samba_dc.ldap_url, tls=tls, get_info=ldap3.NONE, connect_timeout=5)
    conn = ldap3.Connection(server, samba_dc.service_dn, samba_dc.service_password)
    conn.open()
    with pytest.raises(LDAPException, match="CERTIFICATE_VERIFY_FAILED"):
        conn.start_tls()
    assert not conn.bound
    with contextlib.suppress(LDAPException):  # the failed handshake broke the socket
        conn.unbind()


def test_the_service_account_creates_and_deletes_a_contact_under_the_adfs_parent(
    samba_dc: LocalSambaDC,
) -> None:
    dn = f"CN=probe-{uuid.uuid4().hex[:8]},{samba_dc.adfs_parent}"
    with ldaps(samba_dc, samba_dc.service_upn, samba_dc.service_password) as service:
        assert service.add(dn, ["top", "contact"], {"description": "made by svc-farm"})
    with samba_dc.admin_connection() as admin:
        assert admin.search(dn, "(objectClass=contact)", ldap3.BASE)
    with ldaps(samba_dc, samba_dc.service_upn, samba_dc.service_password) as service:
        assert service.delete(dn)
    with samba_dc.admin_connection() as admin:
        admin.raise_exceptions = False
        assert not admin.search(dn, "(objectClass=*)", ldap3.BASE)
        assert admin.result["description"] == "noSuchObject"


@pytest.mark.parametrize("who", ["alice on the AD FS parent", "svc-farm on Undelegated"])
def test_an_account_without_rights_cannot_create_anything_there(
    samba_dc: LocalSambaDC, who: str
) -> None:
    if who.startswith("alice"):
        user, password, parent = samba_dc.other_upn, samba_dc.other_password, samba_dc.adfs_parent
    else:
        user, password = samba_dc.service_upn, samba_dc.service_password
        parent = samba_dc.undelegated_parent
    with ldaps(samba_dc, user, password) as conn:
        conn.raise_exceptions = False
        for object_class in ("contact", "container"):
            assert not conn.add(f"CN=intruder-{object_class},{parent}", ["top", object_class])
            assert conn.result["description"] == "insufficientAccessRights"


def test_stop_frees_the_ports_and_a_new_start_keeps_the_data(samba_dc: LocalSambaDC) -> None:
    dn = f"CN=kept,{samba_dc.adfs_parent}"
    with samba_dc.admin_connection() as admin:
        assert admin.add(dn, ["top", "contact"])
    old_pid = samba_dc.pid
    samba_dc.stop()
    assert not samba_dc.running
    assert all(port_is_free(port) for port in PORTS)
    with pytest.raises(LDAPSocketOpenError):
        ldaps(samba_dc, samba_dc.service_dn, samba_dc.service_password)
    samba_dc.start()
    assert samba_dc.pid != old_pid
    with ldaps(samba_dc, samba_dc.service_dn, samba_dc.service_password) as service:
        assert service.search(dn, "(objectClass=contact)", ldap3.BASE)


def test_the_dc_listens_on_127_0_0_1_only(samba_dc: LocalSambaDC) -> None:
    sockets = samba_dc.listeners()
    assert {(s.protocol, s.port) for s in sockets} >= {("tcp", 389), ("tcp", 636)}
    assert {s.address for s in sockets} == {"127.0.0.1"}, sockets
    assert {s.port for s in sockets} <= set(PORTS)
    # Another loopback address reaches a wildcard listener, never one bound to 127.0.0.1.
    for port in PORTS:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            assert probe.connect_ex(("127.0.0.2", port)) != 0


def test_start_names_what_holds_a_port_of_the_dc(
    samba_template: SambaTemplate, tmp_path: Path
) -> None:
    dc = LocalSambaDC(samba_template, tmp_path / "dc")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", 3269))
        squatter.listen()
        with pytest.raises(
            SambaError,
            match=rf"3269 already in use by pid {os.getpid()} \(.*\) on 127.0.0.1:3269\.",
        ):
            dc.start()
    assert not dc.running
    assert all(port_is_free(port) for port in PORTS)


def test_a_second_dc_in_the_same_process_fails_at_once(
    samba_dc: LocalSambaDC, samba_template: SambaTemplate, tmp_path: Path
) -> None:
    second = LocalSambaDC(samba_template, tmp_path / "second")
    with pytest.raises(SambaError, match="of this process runs already"):
        second.start()
    assert samba_dc.running
    with ldaps(samba_dc, samba_dc.service_dn, samba_dc.service_password) as conn:
        assert conn.bound


# -- the start-and-wait loop the three servers share ---------------------------------------

# Generous: a loaded 2-core machine. No test below waits for it to pass.
SERVING_TIMEOUT_SECONDS = 60.0


class ToyServerError(RuntimeError):
    pass


def toy_server(tmp_path: Path, code: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A Python child running ``code``, its output in a log, as the lab starts its servers."""
    log_path = tmp_path / "toy.log"
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", code], stdout=log_file, stderr=log_file, cwd=tmp_path
        )
    return process, log_path


def wait_for_toy(
    process: subprocess.Popen[bytes], log_path: Path, port: int, stopped: list[str], **options
) -> None:
    def on_failure() -> None:
        stopped.append("stopped")
        process.kill()
        process.wait()

    wait_until_serving(
        process,
        name="toy",
        port=port,
        ready=f"accepting connections on port {port}",
        timeout=options.pop("timeout", SERVING_TIMEOUT_SECONDS),
        log_path=log_path,
        log_offset=0,
        error=ToyServerError,
        on_failure=on_failure,
        **options,
    )


def test_a_server_that_exits_before_serving_is_named_with_its_status_and_output(
    tmp_path: Path,
) -> None:
    process, log_path = toy_server(tmp_path, "print('no such option', flush=True); exit(3)")
    port, stopped = free_port(), []
    with pytest.raises(
        ToyServerError,
        match=rf"^toy exited with status 3 before accepting connections on port {port}; "
        r"its output:\nno such option$",
    ):
        wait_for_toy(process, log_path, port, stopped)
    assert stopped == ["stopped"]


def test_a_server_that_never_serves_is_stopped_and_named_with_the_last_complaint(
    tmp_path: Path,
) -> None:
    listening = (
        "import socket, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "open('port', 'w').write(str(s.getsockname()[1]))\n"
        "print('listening', flush=True); time.sleep(600)\n"
    )
    process, log_path = toy_server(tmp_path, listening)
    port = int(
        wait_until(
            lambda: (tmp_path / "port").exists() and (tmp_path / "port").read_text(),
            SERVING_TIMEOUT_SECONDS,
            "the toy server listens",
        )
    )
    stopped: list[str] = []

    def refuse() -> None:
        raise ConnectionError("the database system is starting up")

    with pytest.raises(
        ToyServerError,
        match=rf"^toy was not accepting connections on port {port} within 1 s "
        r"\(the database system is starting up\); its output:\nlistening$",
    ):
        wait_for_toy(
            process, log_path, port, stopped, check=refuse, starting=(ConnectionError,), timeout=1
        )
    assert stopped == ["stopped"]
    assert process.poll() is not None


def test_a_server_is_serving_once_it_accepts_and_its_check_passes(tmp_path: Path) -> None:
    listening = (
        "import socket, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "open('port', 'w').write(str(s.getsockname()[1]))\n"
        "time.sleep(600)\n"
    )
    process, log_path = toy_server(tmp_path, listening)
    try:
        port = int(
            wait_until(
                lambda: (tmp_path / "port").exists() and (tmp_path / "port").read_text(),
                SERVING_TIMEOUT_SECONDS,
                "the toy server listens",
            )
        )
        answers = iter([ConnectionError("starting"), ConnectionError("recovering"), None])
        checked: list[str] = []

        def check() -> None:
            checked.append("checked")
            answer = next(answers)
            if answer is not None:
                raise answer

        stopped: list[str] = []
        wait_for_toy(process, log_path, port, stopped, check=check, starting=(ConnectionError,))
        assert checked == ["checked"] * 3
        assert stopped == [] and process.poll() is None
    finally:
        process.kill()
        process.wait()


# -- the lab an operator keeps running: python -m farmkeys_lab up (make lab) --------------

# Generous: starting slapd, initdb and `farmkeys init` on a loaded 2-core machine.
LAB_START_SECONDS = 240.0
LAB_STOP_SECONDS = 120.0
TOOLS = Path(__file__).resolve().parents[2] / "tools"


def lab_env() -> dict[str, str]:
    """The environment of the Makefile's `LAB` prefix: tools/ on PYTHONPATH, no FARMKEYS_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMKEYS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TOOLS), env.get("PYTHONPATH")]))
    return env


def run_lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "farmkeys_lab", *args],
        capture_output=True,
        text=True,
        env=lab_env(),
        timeout=LAB_START_SECONDS,
        check=False,
    )


class Lab:
    """`python -m farmkeys_lab up --dir FOLDER` as a child, its output read as it comes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "farmkeys_lab", "up", "--dir", str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=lab_env(),
        )
        self._reader = ThreadPoolExecutor(1)
        self._reader.submit(self._read)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self) -> None:
        wait_until(
            lambda: (
                any(line.startswith("lab ready: ") for line in self.lines)
                or self.process.poll() is not None
            ),
            LAB_START_SECONDS,
            "the lab prints that it is ready",
            detail=lambda: self.output,
        )
        assert self.process.poll() is None, self.output

    def line(self, pattern: str) -> re.Match[str]:
        for line in self.lines:
            if found := re.search(pattern, line):
                return found
        raise AssertionError(f"no line matches {pattern!r} in:\n{self.output}")

    def servers(self) -> dict[str, tuple[int, int]]:
        """What the lab said it started: name -> (port, pid)."""
        slapd = self.line(r"^directory: slapd at ldap://127\.0\.0\.1:(\d+), .*, pid (\d+)$")
        postgres = self.line(r"^config DB: PostgreSQL at 127\.0\.0\.1:(\d+), pid (\d+)$")
        return {
            "slapd": (int(slapd[1]), int(slapd[2])),
            "postgres": (int(postgres[1]), int(postgres[2])),
        }

    def printed_command(self, node: str, command: str) -> list[str]:
        """The command line the lab printed for ``farmkeys --config <node's config> COMMAND``."""
        found = self.line(rf"^  (\S+ --config \S+/{node}\.toml {command})$")
        return shlex.split(found[1])

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=LAB_STOP_SECONDS)
        finally:
            self._reader.shutdown(wait=True)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=LAB_STOP_SECONDS)
        self._reader.shutdown(wait=True)


def gone(port: int, pid: int) -> bool:
    """Nothing listens on ``port`` and process ``pid`` is no more (or only a zombie)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    started = Lab(tmp_path / "lab")
    try:
        yield started
    finally:
        if started.process.poll() is None:
            started.kill()


def test_the_lab_serves_farmkeys_until_sigint_then_stops_both_servers(lab: Lab) -> None:
    lab.wait_ready()
    servers = lab.servers()
    assert all(not gone(port, pid) for port, pid in servers.values())
    assert stat.S_IMODE(lab.folder.stat().st_mode) == 0o700
    configs = [lab.folder / "node-a.toml", lab.folder / "node-b.toml"]
    for config in configs:
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert config.read_text() in lab.output  # printed whole
    assert stat.S_IMODE((lab.folder / "directory.password").stat().st_mode) == 0o600
    assert "created farm 'contoso'" in lab.output  # farmkeys init ran, once
    assert lab.output.count("$ farmkeys init") == 1

    # The printed commands work as printed, against the lab's servers.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARMKEYS_")}
    sync = subprocess.run(
        lab.printed_command("node-a", "sync"), capture_output=True, text=True, env=env, timeout=120
    )
    assert sync.returncode == 0, sync.stderr
    assert "node-a: installed generation 1" in sync.stdout
    assert (lab.folder / "stores" / "node-a" / "manifest.json").is_file()
    status = subprocess.run(
        lab.printed_command("node-a", "status"),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    # ok, or a warning (no `serve` runs here, so nobody leads): never "cannot tell" (3).
    assert status.returncode in (0, 1), status.stdout + status.stderr
    assert "contoso" in status.stdout and "node-a" in status.stdout
    for node in ("node-a", "node-b"):
        lab.printed_command(node, r"serve 2>\S+ &")
    lab.printed_command("node-b", "rollover --purpose signing")

    # A second lab on the same folder is refused in one line, and the first keeps running.
    second = run_lab("up", "--dir", str(lab.folder))
    assert second.returncode == 1
    assert second.stderr.startswith(f"farmkeys-lab: error: a lab already runs in {lab.folder}")
    assert len(second.stderr.splitlines()) == 1, second.stderr
    assert lab.process.poll() is None
    assert all(not gone(port, pid) for port, pid in servers.values())

    assert lab.stop(signal.SIGINT) == 0, lab.output
    assert all(gone(port, pid) for port, pid in servers.values())
    stopped = lab.line(r"^stopped slapd \(pid (\d+)\) and PostgreSQL \(pid (\d+)\);")
    assert (int(stopped[1]), int(stopped[2])) == (servers["slapd"][1], servers["postgres"][1])
    # What pointed at the servers is gone; the logs stay.
    assert not any(config.exists() for config in configs)
    assert not (lab.folder / "directory.password").exists()
    assert (lab.folder / "slapd" / "slapd.log").is_file()


def test_sigterm_stops_the_lab_too_and_a_new_lab_stops_what_a_killed_one_left(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "lab"
    first = Lab(folder)
    try:
        first.wait_ready()
        left = first.servers()
    finally:
        first.kill()  # SIGKILL: its servers run on, in sessions of their own
    assert all(not gone(port, pid) for port, pid in left.values())
    (folder / "left-by-the-first.txt").write_text("")

    second = Lab(folder)
    try:
        second.wait_ready()
        assert all(gone(port, pid) for port, pid in left.values()), second.output
        assert not (folder / "left-by-the-first.txt").exists()  # the folder was cleared
        old_url = f'url = "ldap://127.0.0.1:{left["slapd"][0]}"\n'
        assert old_url not in (folder / "node-a.toml").read_text()
        second.line(r"^stopping the slapd \(pid \d+\) an earlier lab here left running$")
        servers = second.servers()
        assert second.stop(signal.SIGTERM) == 0, second.output
    finally:
        if second.process.poll() is None:
            second.kill()
    assert all(gone(port, pid) for port, pid in servers.values())


def test_the_lab_refuses_a_folder_it_may_not_use_in_one_line(tmp_path: Path) -> None:
    somebodys = tmp_path / "notes"
    somebodys.mkdir()
    (somebodys / "todo.txt").write_text("keep me\n")
    a_file = tmp_path / "file"
    a_file.write_text("")
    for folder, problem in (
        (somebodys, "holds files but is not a lab's folder"),
        (a_file, "is not a folder"),
    ):
        refused = run_lab("up", "--dir", str(folder))
        assert refused.returncode == 1
        assert refused.stderr.startswith(f"farmkeys-lab: error: {folder} {problem}")
        assert len(refused.stderr.splitlines()) == 1, refused.stderr
        assert refused.stdout == ""
    assert (somebodys / "todo.txt").read_text() == "keep me\n"


def test_the_lab_without_a_command_prints_its_usage() -> None:
    refused = run_lab()
    assert refused.returncode == 2
    assert "usage: python -m farmkeys_lab" in refused.stderr
    assert "the following arguments are required: COMMAND" in refused.stderr


def test_a_lab_whose_server_dies_says_which_and_exits_1(lab: Lab) -> None:
    lab.wait_ready()
    servers = lab.servers()
    os.kill(servers["slapd"][1], signal.SIGKILL)
    assert lab.process.wait(timeout=LAB_STOP_SECONDS) == 1, lab.output
    lab.stop()
    error = lab.line(r"^farmkeys-lab: error: slapd stopped by itself; its log is (\S+)$")
    assert Path(error[1]) == lab.folder / "slapd" / "slapd.log"
    assert all(gone(port, pid) for port, pid in servers.values())
