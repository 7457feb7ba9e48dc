"""Who listens where: the sockets of ``/proc/net``, and whether the DC's fixed ports are free."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from farmkeys_lab.samba.domain import PORTS, SambaError
from farmkeys_lab.servers import LOOPBACK


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


def ports_problem() -> str | None:
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


def wait_ports_free(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        problem = ports_problem()
        if problem is None:
            return
        if time.monotonic() >= deadline:
            raise SambaError(
                f"the stopped DC's ports are still taken after {timeout:.0f} s: {problem}"
            )
        time.sleep(0.02)
