"""A private Samba Active Directory domain controller on loopback, for the tests.

Provisioning a domain takes seconds, so it happens once: :meth:`SambaTemplate.provision`
runs ``samba-tool domain provision`` (realm ``FARMKEYS.LAB``, NetBIOS domain
``FARMKEYS``) into a work directory and seeds it::

    DC=farmkeys,DC=lab
    ├── CN=Users
    │   ├── CN=Administrator          the domain's administrator
    │   ├── CN=svc-farm               the farm's service account (svc-farm@farmkeys.lab)
    │   └── CN=alice                  an ordinary user (alice@farmkeys.lab)
    └── CN=Program Data
        ├── CN=Microsoft
        │   └── CN=ADFS               the AD FS parent: svc-farm has full control of it,
        │                             inherited by what is created beneath it
        └── CN=Undelegated            a parent on which svc-farm has no extra rights

:class:`LocalSambaDC` copies that template into a directory of its own and runs
``samba`` on the copy with only its LDAP service (``server services = ldap``),
listening on 127.0.0.1 only. Every path of its smb.conf is inside its own
directory: nothing is written to /etc/samba, /var/lib/samba or /run/samba.

- **Fixed ports.** Samba's LDAP server has no port setting: it listens on 389
  (LDAP), 636 (LDAPS) and, the provisioned DC being a global catalog, 3268 and
  3269. ``interfaces`` accepts only addresses configured on an interface (not
  127.0.0.2), so one lab DC runs at a time on 127.0.0.1. A running DC holds an
  flock on :data:`LOCK_PATH`: another test run's ``start()`` waits for it, a
  second DC in the same process fails at once. ``start()`` then checks the four
  ports and names whatever holds one; ``stop()`` kills the whole process group
  and waits until the ports are free again.
- **Process.** ``samba -i -M single``: the foreground, one process (no forked
  workers), its own process group, only its LDAP service. Starting a copy takes
  about 0.6 s (Samba's own start-up), copying the template (33 MB) 0.03 s.
- **TLS.** The template has a CA of its own (``cryptography``) and a server
  certificate for ``IP:127.0.0.1, DNS:localhost``; clients verify the DC with
  ``ca_file``. Simple binds need TLS (Samba's default
  ``ldap server require strong auth = yes``): ldaps on 636, or StartTLS on 389.
- **Secrets.** The passwords are random and kept in clear only in
  ``<template>/lab.json`` (mode 0600) with the DNs, SIDs and UPNs a test needs.

Nothing here is meant for production: it is a disposable server for tests, run
as root (``samba-tool domain provision`` and ``samba`` need it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import ldap3
from cryptography import x509
from ldap3.core.exceptions import LDAPException, LDAPNoSuchObjectResult

from farmkeys_lab import tls
from farmkeys_lab.servers import LOOPBACK, accepts, log_tail

log = logging.getLogger(__name__)

REALM = "FARMKEYS.LAB"
DOMAIN = "FARMKEYS"
DNS_DOMAIN = "farmkeys.lab"
BASE_DN = "DC=farmkeys,DC=lab"
HOST_NAME = "labdc"  # fixed, so the provision does not depend on the machine's name
SERVICE_ACCOUNT = "svc-farm"
OTHER_ACCOUNT = "alice"
PROGRAM_DATA = f"CN=Program Data,{BASE_DN}"
ADFS_PARENT = f"CN=ADFS,CN=Microsoft,{PROGRAM_DATA}"
UNDELEGATED_PARENT = f"CN=Undelegated,{PROGRAM_DATA}"

LDAP_PORT = 389
LDAPS_PORT = 636
# Everything the DC listens on: Samba fixes these (no smb.conf setting moves them).
PORTS = (LDAP_PORT, LDAPS_PORT, 3268, 3269)

SAMBA_CANDIDATES = (Path("/usr/sbin/samba"),)
SAMBA_TOOL_CANDIDATES = (Path("/usr/bin/samba-tool"),)
PROVISION_SETUP_DIR = Path("/usr/share/samba/setup")  # Debian's samba-ad-provision

RECORD_NAME = "lab.json"  # in a template's work directory: what the tests need to know
DOMAIN_DIR_NAME = "domain"  # in a template's or a DC's work directory: the provisioned tree

# One lab DC per machine (the ports are fixed): a DC holds an flock on this file from
# start() to stop(), and another test run's start() waits for it rather than failing.
LOCK_PATH = Path(tempfile.gettempdir()) / "farmkeys-lab-samba.lock"

# How long the template's samba-tool runs may take, start() waits for another run's DC
# to stop and then for an ldaps bind, and stop() for the processes to exit and the ports
# to be free.
PROVISION_TIMEOUT_SECONDS = 300.0
LOCK_TIMEOUT_SECONDS = 600.0
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0


class SambaError(RuntimeError):
    """Samba is missing, failed to provision or to start; the message carries its output."""


def find_samba() -> Path | None:
    """The ``samba`` server binary: the usual path, then ``$PATH``."""
    return _find("samba", SAMBA_CANDIDATES)


def find_samba_tool() -> Path | None:
    """The ``samba-tool`` binary: the usual path, then ``$PATH``."""
    return _find("samba-tool", SAMBA_TOOL_CANDIDATES)


def _find(name: str, candidates: Sequence[Path]) -> Path | None:
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise SambaError(
            f"{what} needs root: samba-tool domain provision chowns the domain's files, and "
            "Samba's LDAP ports (389, 636, 3268, 3269) are privileged"
        )


def missing_samba() -> str | None:
    """What of Samba's AD DC is not installed, as a sentence; None when all of it is."""
    missing = [
        name
        for name, found in (
            ("samba", find_samba() is not None),
            ("samba-tool", find_samba_tool() is not None),
            (str(PROVISION_SETUP_DIR), PROVISION_SETUP_DIR.is_dir()),
        )
        if not found
    ]
    if not missing:
        return None
    return (
        f"Samba's AD DC is not installed (missing: {', '.join(missing)}); run `make servers`, "
        "which installs Debian's samba, samba-ad-dc, samba-ad-provision and samba-dsdb-modules"
    )


# -- sockets: who listens where ---------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    """A listening TCP socket or a bound UDP socket, from ``/proc/net``."""

    protocol: str  # tcp, tcp6, udp or udp6
    address: str
    port: int
    pid: int | None  # None when its owner is not visible to us
    command: str
    cwd: str | None = None

    @property
    def owner(self) -> str:
        if self.pid is None:
            return "an unknown process"
        where = f", working directory {self.cwd}" if self.cwd else ""
        return f"pid {self.pid} ({self.command}{where})"

    @property
    def endpoint(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.owner} on {self.protocol} {self.endpoint}"


_BOUND_STATES = {"tcp": "0A", "tcp6": "0A", "udp": "07", "udp6": "07"}  # LISTEN, unconnected


def listeners(
    port: int | None = None, *, protocols: Sequence[str] = tuple(_BOUND_STATES)
) -> list[Listener]:
    """The sockets of this network namespace listening (TCP) or bound (UDP), on ``port`` or all."""
    owners = _socket_owners()
    found: list[Listener] = []
    for protocol in protocols:
        try:
            lines = Path(f"/proc/net/{protocol}").read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _BOUND_STATES[protocol]:
                continue
            hex_address, hex_port = fields[1].split(":")
            local_port = int(hex_port, 16)
            if port is not None and local_port != port:
                continue
            pid, command = owners.get(int(fields[9]), (None, "?"))
            cwd = None
            if pid is not None:
                with contextlib.suppress(OSError):
                    cwd = os.readlink(f"/proc/{pid}/cwd")
            address = _proc_address(hex_address)
            found.append(Listener(protocol, address, local_port, pid, command, cwd))
    return found


def _proc_address(hex_address: str) -> str:
    """An address as /proc/net prints it: 32-bit words in host byte order, in hex."""
    words = [int(hex_address[i : i + 8], 16) for i in range(0, len(hex_address), 8)]
    packed = b"".join(struct.pack("=I", word) for word in words)
    return str(ipaddress.ip_address(packed))


def _socket_owners() -> dict[int, tuple[int, str]]:
    """Socket inode → (pid, command) for every process whose descriptors we may read."""
    owners: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        command: str | None = None
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target.endswith("]"):
                if command is None:
                    command = _command(int(entry.name))
                owners.setdefault(int(target[8:-1]), (int(entry.name), command))
    return owners


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(part.decode("utf-8", "replace") for part in raw.split(b"\0") if part)[:200]


def _port_taken(port: int) -> bool:
    """Whether 127.0.0.1:``port`` cannot be bound (a listener there or on a wildcard)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As Samba binds: connections left in TIME_WAIT by an earlier DC do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


def _ports_problem() -> str | None:
    """Which of the DC's fixed ports are taken and by whom, as a sentence; None if all are free."""
    taken = [port for port in PORTS if _port_taken(port)]
    if not taken:
        return None
    found = [h for port in taken for h in listeners(port, protocols=("tcp", "tcp6"))]
    holders: dict[str, list[str]] = {}
    for holder in found:
        holders.setdefault(holder.owner, []).append(holder.endpoint)
    unseen = sorted(set(taken) - {h.port for h in found})
    described = [f"{owner} on {', '.join(where)}" for owner, where in holders.items()]
    if unseen:
        described.append(f"something not visible to us on {', '.join(map(str, unseen))}")
    hint = ""
    if any(h.command.startswith("samba") for h in found):
        hint = (
            " (a samba left running by an interrupted test run? `kill -- -PID` stops its "
            "process group)"
        )
    return (
        f"127.0.0.1 port(s) {', '.join(map(str, taken))} already in use by "
        f"{'; '.join(described)}. The lab's Samba DC needs 127.0.0.1:"
        f"{', '.join(map(str, PORTS))} (Samba's LDAP ports are fixed), so only one lab DC "
        f"can run at a time: stop that process first{hint}"
    )


def _wait_ports_free(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        problem = _ports_problem()
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise SambaError(
                f"the stopped DC's ports are still taken after {timeout:.0f} s: {problem}"
            )
        time.sleep(0.02)


# -- one DC per machine ------------------------------------------------------------------


class _MachineLock:
    """The right to run the lab's DC on this machine: an exclusive flock on LOCK_PATH.

    The kernel drops it when its holder dies. Within one process a second DC fails
    at once (it would wait for itself); another process's DC is waited for.
    """

    _held_in_this_process: str | None = None  # the holder's work directory

    def __init__(self) -> None:
        self._fd: int | None = None

    def acquire(self, holder: Path) -> None:
        if self._fd is not None:
            return
        if _MachineLock._held_in_this_process is not None:
            raise SambaError(
                f"a lab Samba DC of this process runs already (in "
                f"{_MachineLock._held_in_this_process}); Samba's LDAP ports are fixed, so "
                "stop it before starting another"
            )
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                other = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise SambaError(
                        f"another lab Samba DC ({other or 'holder unknown'}) has held "
                        f"{LOCK_PATH} for more than {LOCK_TIMEOUT_SECONDS:.0f} s; Samba's "
                        "LDAP ports are fixed, so only one runs at a time"
                    ) from None
                if not waiting:
                    log.info("waiting for another lab Samba DC to stop (%s)", other)
                    waiting = True
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {holder}\n".encode(), 0)
        self._fd = fd
        _MachineLock._held_in_this_process = str(holder)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        _MachineLock._held_in_this_process = None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # drops the flock


# -- processes ---------------------------------------------------------------------------


def _group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process in process group ``pgid``."""
    members: list[tuple[int, str]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        fields = text.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[2] == str(pgid):
            members.append((int(entry.name), fields[0]))
    return members


def _live_members(process: subprocess.Popen[bytes]) -> list[int]:
    process.poll()  # reap the leader once it exits
    return [pid for pid, state in _group_members(process.pid) if state not in ("Z", "X")]


def _stop_group(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM samba's whole process group, wait; SIGKILL whatever outlasts the timeout."""
    if process is None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _live_members(process):
            break
        if sig == signal.SIGKILL:
            log.warning("samba %d did not stop on SIGTERM; killing its process group", process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while _live_members(process) and time.monotonic() < deadline:
            time.sleep(0.02)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    if _live_members(process):
        raise SambaError(f"samba's process group {process.pid} survived SIGKILL")


def _launch(samba: Path, conf: Path, log_path: Path) -> subprocess.Popen[bytes]:
    if (problem := _ports_problem()) is not None:
        raise SambaError(f"cannot start the lab's Samba DC: {problem}")
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            # -i: the foreground, logging to stdout; -M single: one process, no forked workers.
            [str(samba), "-i", "-M", "single", "--debuglevel=1", f"--configfile={conf}"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            cwd=conf.parent,
            start_new_session=True,  # its own process group, killed whole by _stop_group
        )


def _wait_until_ready(
    process: subprocess.Popen[bytes],
    *,
    log_path: Path,
    offset: int,
    ca_file: Path,
    user: str,
    password: str,
) -> None:
    """Wait until ``user`` binds over ldaps with CA verification; stop samba and raise if not."""
    url = f"ldaps://{LOOPBACK}:{LDAPS_PORT}"
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            code = process.returncode
            _stop_group(process)
            raise SambaError(
                f"samba exited with status {code} before answering on {url}; its output:\n"
                f"{log_tail(log_path, offset)}"
            )
        if accepts(LDAPS_PORT):
            try:
                connect(url, user, password, ca_file, timeout=2).unbind()
                return
            except (LDAPException, OSError) as exc:  # still starting
                last = " ".join(str(exc).split()) or type(exc).__name__
        time.sleep(0.05)
    _stop_group(process)
    raise SambaError(
        f"samba did not accept an ldaps bind on {url} within {START_TIMEOUT_SECONDS:.0f} s "
        f"({last}); its output:\n{log_tail(log_path, offset)}"
    )


# -- LDAP ------------------------------------------------------------------------------


def tls_for(ca_file: Path) -> ldap3.Tls:
    """ldap3 TLS settings that verify the server's certificate and name against ``ca_file``."""
    return ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca_file))


def connect(
    url: str,
    user: str,
    password: str,
    ca_file: Path,
    *,
    start_tls: bool = False,
    timeout: int = 5,
) -> ldap3.Connection:
    """An ldap3 connection bound as ``user`` (a DN or a UPN): ldaps, or ldap + StartTLS.

    The server's certificate is always verified with ``ca_file``. Raises
    ldap3's exceptions on any failure (refused bind, bad certificate).
    """
    server = ldap3.Server(url, tls=tls_for(ca_file), get_info=ldap3.NONE, connect_timeout=timeout)
    return ldap3.Connection(
        server,
        user=user,
        password=password,
        auto_bind=ldap3.AUTO_BIND_TLS_BEFORE_BIND if start_tls else ldap3.AUTO_BIND_NO_TLS,
        raise_exceptions=True,
        receive_timeout=timeout,
    )


def sid_text(raw: bytes) -> str:
    """A binary ``objectSid`` as ``S-1-5-21-…``."""
    revision, count = raw[0], raw[1]
    authority = int.from_bytes(raw[2:8], "big")
    subs = struct.unpack(f"<{count}I", raw[8 : 8 + 4 * count])
    return "S-" + "-".join(str(part) for part in (revision, authority, *subs))


# -- TLS ---------------------------------------------------------------------------------


def write_ca_certificate(path: Path, common_name: str = "farmkeys lab: an unrelated CA") -> Path:
    """Write a fresh self-signed CA certificate (PEM) to ``path``, its key discarded.

    For tests that need a CA which did not issue the DC's certificate.
    """
    return tls.write_pem(Path(path), tls.new_ca(common_name)[1])


def _write_tls(directory: Path) -> None:
    """A CA, and a server certificate it issued for 127.0.0.1 and localhost, into ``directory``.

    ``ca.pem``, ``cert.pem`` and ``key.pem`` (0600: Samba refuses a key others can read).
    The CA's key is not kept.
    """
    authority = tls.new_ca(f"farmkeys lab CA {secrets.token_hex(4)}")
    names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
        x509.DNSName("localhost"),
    ]
    key, certificate = tls.issue_server(authority, names)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in ("ca.pem", "cert.pem", "key.pem"):
        (directory / stale).unlink(missing_ok=True)
    tls.write_pem(directory / "ca.pem", authority[1])
    tls.write_pem(directory / "cert.pem", certificate)
    tls.write_key(directory / "key.pem", key)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_smb_conf(domain_dir: Path, *, into: Path | None = None) -> Path:
    """The DC's smb.conf, every path inside ``domain_dir`` (none in /run, /var or /etc).

    Written into ``into`` (default: ``domain_dir``), a copy to be renamed ``domain_dir``.
    """
    d = domain_dir
    target = into or domain_dir
    tls = d / "private" / "tls"
    settings = {
        "netbios name": HOST_NAME.upper(),
        "realm": REALM,
        "workgroup": DOMAIN,
        "server role": "active directory domain controller",
        "server services": "ldap",
        "interfaces": LOOPBACK,
        "bind interfaces only": "yes",
        "idmap_ldb:use rfc2307": "yes",
        "private dir": d / "private",
        "lock directory": d,
        "state directory": d / "state",
        "cache directory": d / "cache",
        "binddns dir": d / "bind-dns",
        "pid directory": d / "run",
        "ncalrpc dir": d / "run" / "ncalrpc",
        "ntp signd socket directory": d / "run" / "ntp_signd",
        "winbindd socket directory": d / "run" / "winbindd",
        "log file": d / "samba.log",  # unused in the foreground (-i logs to stdout)
        "tls enabled": "yes",
        "tls keyfile": tls / "key.pem",
        "tls certfile": tls / "cert.pem",
        "tls cafile": tls / "ca.pem",
    }
    for directory in ("run", "cache", "etc"):
        (target / directory).mkdir(exist_ok=True)
    text = (
        "# Written by farmkeys_lab.samba; a disposable test domain controller.\n[global]\n"
        + "".join(f"\t{name} = {value}\n" for name, value in settings.items())
    )
    path = target / "etc" / "smb.conf"
    path.write_text(text, encoding="utf-8")
    return path


def _copy_ignoring_sockets(directory: str, names: list[str]) -> set[str]:
    """shutil.copytree's ``ignore``: the sockets and FIFOs a running samba left behind."""
    ignored: set[str] = set()
    for name in names:
        with contextlib.suppress(OSError):
            mode = os.lstat(os.path.join(directory, name)).st_mode
            if stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode):
                ignored.add(name)
    return ignored


# -- the template ------------------------------------------------------------------------


def _password() -> str:
    """A random password Samba's complexity rules accept (and no option-looking leading -)."""
    return "Lab1" + secrets.token_urlsafe(18)


@dataclass(frozen=True)
class SambaTemplate:
    """A provisioned, seeded domain in ``workdir``, never run again: copied by LocalSambaDC."""

    workdir: Path
    realm: str
    dns_domain: str
    base_dn: str
    domain_sid: str
    admin_dn: str
    admin_password: str = dataclasses.field(repr=False)
    service_dn: str
    service_upn: str
    service_password: str = dataclasses.field(repr=False)
    service_sid: str
    other_dn: str
    other_upn: str
    other_password: str = dataclasses.field(repr=False)
    other_sid: str
    adfs_parent: str
    undelegated_parent: str
    samba_version: str

    @property
    def domain_dir(self) -> Path:
        return self.workdir / DOMAIN_DIR_NAME

    @property
    def record_path(self) -> Path:
        return self.workdir / RECORD_NAME

    @property
    def ca_file(self) -> Path:
        return self.domain_dir / "private" / "tls" / "ca.pem"

    @classmethod
    def load(cls, workdir: Path) -> SambaTemplate:
        """The template an earlier :meth:`provision` left in ``workdir``."""
        workdir = Path(workdir).resolve()
        record: dict[str, str] = json.loads((workdir / RECORD_NAME).read_text(encoding="utf-8"))
        return cls(workdir=workdir, **record)

    @classmethod
    def provision(cls, workdir: Path) -> SambaTemplate:
        """Provision and seed a domain in ``workdir``; an existing template there is reused."""
        workdir = Path(workdir).resolve()
        if (workdir / RECORD_NAME).is_file() and (workdir / DOMAIN_DIR_NAME).is_dir():
            return cls.load(workdir)
        problem = missing_samba()
        if problem is not None:
            raise SambaError(problem)
        _require_root("provisioning the lab's Samba domain")
        samba, tool = find_samba(), find_samba_tool()
        assert samba is not None
        assert tool is not None
        return _provision(cls, workdir, samba, tool)

    def record(self) -> dict[str, str]:
        """What ``lab.json`` holds: everything but the work directory."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "workdir"}


def _provision(cls: type[SambaTemplate], workdir: Path, samba: Path, tool: Path) -> SambaTemplate:
    domain_dir = workdir / DOMAIN_DIR_NAME
    if domain_dir.exists():
        shutil.rmtree(domain_dir)  # left by an interrupted provision
    workdir.mkdir(parents=True, exist_ok=True)
    tool_log = workdir / "provision.log"
    admin_password, service_password, other_password = _password(), _password(), _password()

    # An empty configuration, so nothing of the machine's /etc/samba/smb.conf leaks in.
    empty = workdir / "empty.conf"
    empty.write_text("", encoding="utf-8")
    _run_tool(
        tool,
        "provisioning the domain",
        "domain",
        "provision",
        f"--configfile={empty}",
        "--use-rfc2307",
        f"--realm={REALM}",
        f"--domain={DOMAIN}",
        f"--host-name={HOST_NAME}",
        "--server-role=dc",
        "--dns-backend=NONE",
        f"--adminpass={admin_password}",
        f"--targetdir={domain_dir}",
        log_path=tool_log,
    )
    _write_tls(domain_dir / "private" / "tls")
    conf = _write_smb_conf(domain_dir)
    sam = domain_dir / "private" / "sam.ldb"
    local = (f"--configfile={conf}", f"-H{sam}")
    for name, password in ((SERVICE_ACCOUNT, service_password), (OTHER_ACCOUNT, other_password)):
        _run_tool(
            tool, f"creating {name}", "user", "create", name, password, *local, log_path=tool_log
        )

    # The containers need an LDAP add, which samba-tool has no command for: run the DC briefly.
    admin_dn = f"CN=Administrator,CN=Users,{BASE_DN}"
    ca_file = domain_dir / "private" / "tls" / "ca.pem"
    log_path = workdir / "samba.log"
    lock = _MachineLock()
    lock.acquire(workdir)
    process: subprocess.Popen[bytes] | None = None
    try:
        process = _launch(samba, conf, log_path)
        _wait_until_ready(
            process,
            log_path=log_path,
            offset=0,
            ca_file=ca_file,
            user=admin_dn,
            password=admin_password,
        )
        url = f"ldaps://{LOOPBACK}:{LDAPS_PORT}"
        with connect(url, admin_dn, admin_password, ca_file) as admin:
            for dn in (f"CN=Microsoft,{PROGRAM_DATA}", ADFS_PARENT, UNDELEGATED_PARENT):
                if not _exists(admin, dn):
                    admin.add(dn, ["top", "container"])
            domain_sid = _read(admin, BASE_DN)[1]
            service_dn, service_sid, service_upn = _read_account(admin, SERVICE_ACCOUNT)
            other_dn, other_sid, other_upn = _read_account(admin, OTHER_ACCOUNT)
    except LDAPException as exc:
        raise SambaError(f"seeding the template over LDAP failed: {exc}") from exc
    finally:
        try:
            if process is not None:
                _stop_group(process)
                _wait_ports_free(STOP_TIMEOUT_SECONDS)
        finally:
            lock.release()

    # Full control of the AD FS parent, inherited by everything created beneath it. Samba
    # stores the ACE as two: (A;;RPWPCRCCDCLCLORCWOWDSDDTSW;;;SID), GA mapped to the
    # directory's full control on the parent itself, and (A;CIIO;GA;;;SID) for its children.
    _run_tool(
        tool,
        "delegating the AD FS parent",
        "dsacl",
        "set",
        *local,
        f"--objectdn={ADFS_PARENT}",
        f"--trusteedn={service_dn}",
        f"--sddl=(A;CI;GA;;;{service_sid})",
        log_path=tool_log,
    )
    version = subprocess.run(
        [str(samba), "--version"], capture_output=True, text=True, check=False, timeout=30
    ).stdout.strip()
    template = cls(
        workdir=workdir,
        realm=REALM,
        dns_domain=DNS_DOMAIN,
        base_dn=BASE_DN,
        domain_sid=domain_sid,
        admin_dn=admin_dn,
        admin_password=admin_password,
        service_dn=service_dn,
        service_upn=service_upn,
        service_password=service_password,
        service_sid=service_sid,
        other_dn=other_dn,
        other_upn=other_upn,
        other_password=other_password,
        other_sid=other_sid,
        adfs_parent=ADFS_PARENT,
        undelegated_parent=UNDELEGATED_PARENT,
        samba_version=version,
    )
    _write_private(template.record_path, json.dumps(template.record(), indent=2).encode())
    return template


def _run_tool(tool: Path, what: str, *args: str, log_path: Path) -> None:
    """Run samba-tool; its output goes to ``log_path``. The arguments (passwords) are not logged."""
    started = time.monotonic()
    try:
        done = subprocess.run(
            [str(tool), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=PROVISION_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired as exc:
        raise SambaError(
            f"samba-tool ({what}) did not finish within {PROVISION_TIMEOUT_SECONDS:.0f} s"
        ) from exc
    output = (done.stdout + done.stderr).strip()
    with log_path.open("a", encoding="utf-8") as f:
        f.write(f"== samba-tool {args[0]} {args[1]} ({what}): status {done.returncode}, ")
        f.write(f"{time.monotonic() - started:.1f} s\n{output}\n")
    if done.returncode != 0:
        raise SambaError(
            f"samba-tool failed {what} with status {done.returncode}: {output[-2000:]}"
        )


def _exists(conn: ldap3.Connection, dn: str) -> bool:
    try:
        return bool(conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["1.1"]))
    except LDAPNoSuchObjectResult:
        return False


def _search_one(
    conn: ldap3.Connection, base: str, scope: str, search: str, attributes: list[str]
) -> dict[str, Any]:
    conn.search(base, search, scope, attributes=attributes)
    entries: list[dict[str, Any]] = [r for r in conn.response if r.get("type") == "searchResEntry"]
    if len(entries) != 1:
        raise SambaError(f"expected one entry for {search} under {base}, found {len(entries)}")
    return entries[0]


def _read(conn: ldap3.Connection, dn: str) -> tuple[str, str]:
    entry = _search_one(conn, dn, ldap3.BASE, "(objectClass=*)", ["objectSid"])
    return str(entry["dn"]), sid_text(entry["raw_attributes"]["objectSid"][0])


def _read_account(conn: ldap3.Connection, name: str) -> tuple[str, str, str]:
    """(DN, SID, UPN) of the account whose sAMAccountName is ``name``."""
    entry = _search_one(
        conn,
        BASE_DN,
        ldap3.SUBTREE,
        f"(sAMAccountName={name})",
        ["objectSid", "userPrincipalName"],
    )
    raw = entry["raw_attributes"]
    if not raw.get("userPrincipalName"):
        raise SambaError(f"samba-tool user create gave {entry['dn']} no userPrincipalName")
    return str(entry["dn"]), sid_text(raw["objectSid"][0]), raw["userPrincipalName"][0].decode()


# -- the domain controller ---------------------------------------------------------------


class LocalSambaDC:
    """A disposable Samba AD DC on ``ldaps://127.0.0.1:636``, a copy of a :class:`SambaTemplate`.

    The copy is made when the object is built (if ``workdir`` holds none yet);
    ``start()`` again after ``stop()`` reuses it, so tests can take the directory
    away from running nodes and bring it back.
    """

    url = f"ldaps://{LOOPBACK}:{LDAPS_PORT}"
    ldap_url = f"ldap://{LOOPBACK}:{LDAP_PORT}"  # for StartTLS; a plain simple bind is refused

    def __init__(self, template: SambaTemplate, workdir: Path) -> None:
        self.template = template
        self.workdir = Path(workdir).resolve()
        self.realm = template.realm
        self.dns_domain = template.dns_domain
        self.base_dn = template.base_dn
        self.domain_sid = template.domain_sid
        self.adfs_parent = template.adfs_parent
        self.undelegated_parent = template.undelegated_parent
        self.admin_dn = template.admin_dn
        self.admin_password = template.admin_password
        self.service_dn = template.service_dn
        self.service_upn = template.service_upn
        self.service_password = template.service_password
        self.service_sid = template.service_sid
        self.other_dn = template.other_dn
        self.other_upn = template.other_upn
        self.other_password = template.other_password
        self.other_sid = template.other_sid
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = _MachineLock()
        if not self.conf_path.is_file():
            self._copy_template()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LocalSambaDC {self.url} {self.base_dn} {state}>"

    @property
    def domain_dir(self) -> Path:
        return self.workdir / DOMAIN_DIR_NAME

    @property
    def conf_path(self) -> Path:
        return self.domain_dir / "etc" / "smb.conf"

    @property
    def ca_file(self) -> Path:
        """The lab CA's certificate (PEM), which issued the DC's: give it to every client."""
        return self.domain_dir / "private" / "tls" / "ca.pem"

    @property
    def log_path(self) -> Path:
        return self.workdir / "samba.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """samba's pid, also its process group's id; None when stopped."""
        return self._process.pid if self.running and self._process is not None else None

    def connect(self, user: str, password: str, *, start_tls: bool = False) -> ldap3.Connection:
        """An ldap3 connection bound as ``user`` (DN or UPN), over ldaps or ldap + StartTLS."""
        url = self.ldap_url if start_tls else self.url
        return connect(url, user, password, self.ca_file, start_tls=start_tls)

    def admin_connection(self) -> ldap3.Connection:
        """An ldap3 connection bound as the domain's Administrator over ldaps (CA verified)."""
        return self.connect(self.admin_dn, self.admin_password)

    def listeners(self) -> list[Listener]:
        """The sockets samba's process group listens on (TCP) or has bound (UDP)."""
        pid = self.pid
        if pid is None:
            return []
        group = {member for member, _ in _group_members(pid)}
        return [s for s in listeners() if s.pid in group]

    def write_password_file(self, path: Path, which: str = "service") -> Path:
        """Write the password of ``which`` (service, other or admin) to ``path``, mode 0600."""
        passwords = {
            "service": self.service_password,
            "other": self.other_password,
            "admin": self.admin_password,
        }
        if which not in passwords:
            raise ValueError(f"which must be one of {sorted(passwords)}, not {which!r}")
        path = Path(path)
        _write_private(path, (passwords[which] + "\n").encode())
        return path

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start samba on the copy (a no-op if it runs); return once an ldaps bind works."""
        if self.running:
            return
        samba = find_samba()
        if samba is None:
            raise SambaError(missing_samba() or "samba not found")
        _require_root("running the lab's Samba DC")
        self._lock.acquire(self.workdir)
        try:
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            process = _launch(samba, self.conf_path, self.log_path)
            _wait_until_ready(
                process,
                log_path=self.log_path,
                offset=offset,
                ca_file=self.ca_file,
                user=self.admin_dn,
                password=self.admin_password,
            )
        except BaseException:
            self._lock.release()
            raise
        self._process = process
        log.info("samba %d answering on %s", process.pid, self.url)

    def stop(self) -> None:
        """Stop samba's whole process group and wait until its ports are free. Data is kept."""
        process, self._process = self._process, None
        try:
            if process is not None:
                _stop_group(process)
                _wait_ports_free(STOP_TIMEOUT_SECONDS)
        finally:
            self._lock.release()

    def restart(self) -> None:
        """Stop, then start again on the same copy."""
        self.stop()
        self.start()

    def remove(self) -> None:
        """Stop samba and delete the copy of the domain (the log is kept)."""
        self.stop()
        shutil.rmtree(self.domain_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------

    def _copy_template(self) -> None:
        partial = self.workdir / f"{DOMAIN_DIR_NAME}.partial"
        for leftover in (partial, self.domain_dir):  # from a copy that was interrupted
            if leftover.exists():
                shutil.rmtree(leftover)
        self.workdir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(
            self.template.domain_dir, partial, symlinks=True, ignore=_copy_ignoring_sockets
        )
        # The template's smb.conf names the template's directory everywhere: write our own.
        _write_smb_conf(self.domain_dir, into=partial)
        partial.rename(self.domain_dir)
