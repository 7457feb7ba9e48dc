"""Running samba: one DC per machine (an flock), its process group, start-up and stop."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

from ldap3.core.exceptions import LDAPException

from farmkeys_lab.samba.domain import (
    LDAPS_PORT,
    LOCK_PATH,
    LOCK_TIMEOUT_SECONDS,
    START_TIMEOUT_SECONDS,
    STOP_TIMEOUT_SECONDS,
    SambaError,
)
from farmkeys_lab.samba.ldap import connect
from farmkeys_lab.samba.sockets import ports_problem
from farmkeys_lab.servers import LOOPBACK, wait_until_serving

log = logging.getLogger(__name__)


class MachineLock:
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
        if MachineLock._held_in_this_process is not None:
            raise SambaError(
                f"a lab Samba DC of this process runs already (in "
                f"{MachineLock._held_in_this_process}); Samba's LDAP ports are fixed, so "
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
        MachineLock._held_in_this_process = str(holder)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        MachineLock._held_in_this_process = None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # drops the flock


# -- processes ---------------------------------------------------------------------------


def group_members(pgid: int) -> list[tuple[int, str]]:
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
    return [pid for pid, state in group_members(process.pid) if state not in ("Z", "X")]


def stop_group(process: subprocess.Popen[bytes] | None) -> None:
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


def launch(samba: Path, conf: Path, log_path: Path) -> subprocess.Popen[bytes]:
    if (problem := ports_problem()) is not None:
        raise SambaError(f"cannot start the lab's Samba DC: {problem}")
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            # -i: the foreground, logging to stdout; -M single: one process, no forked workers.
            [str(samba), "-i", "-M", "single", "--debuglevel=1", f"--configfile={conf}"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            cwd=conf.parent,
            start_new_session=True,  # its own process group, killed whole by stop_group
        )


def wait_until_ready(
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
    wait_until_serving(
        process,
        name="samba",
        port=LDAPS_PORT,
        ready=f"accepting an ldaps bind on {url}",
        timeout=START_TIMEOUT_SECONDS,
        log_path=log_path,
        log_offset=offset,
        error=SambaError,
        on_failure=lambda: stop_group(process),
        check=lambda: connect(url, user, password, ca_file, timeout=2).unbind(),
        starting=(LDAPException, OSError),  # still starting
    )
