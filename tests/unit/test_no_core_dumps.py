"""Every `farmkeys` command forbids core dumps of itself before it reads anything secret.

A running command is looked at from outside, as an attacker on the node would: its
``/proc/<pid>/limits`` says no core file, and its ``/proc/<pid>`` files belong to
root:root although it runs with another group, which the kernel does only for a process
that is not dumpable (proc(5)): its account cannot ptrace it or read its memory either.
(The group, not the user, is changed: this machine's Python lives under /root, which
only root may enter.) The
command is `farmkeys status` waiting out a config DB that refuses connections: it runs
long enough to be looked at and needs no server.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from farmtools import REPO, clean_env

from farmkeys_lab.servers import free_port

NOGROUP = 65534


@pytest.fixture
def config_file() -> Iterator[Path]:
    """A config whose config DB refuses connections for 30 s of retries; in a folder any
    account can read (not under pytest's 0700 tmp folders), root's and not writable."""
    folder = Path(tempfile.mkdtemp(prefix="farmkeys-core-"))
    folder.chmod(0o755)
    path = folder / "farmkeys.toml"
    path.write_text(
        f"""
[farm]
name = "contoso"
[node]
id = "node-a"
store = "{folder}/store"
[database]
dsn = "postgresql://farmkeys@127.0.0.1:{free_port()}/farmkeys"
connect_timeout_seconds = 1
[directory]
url = "ldap://127.0.0.1:{free_port()}"
bind_dn = "cn=svc-farm,ou=people,dc=example"
password_file = "{folder}/directory-password"
container = "ou=dkm,dc=example"
[retry]
total_seconds = 30
"""
    )
    path.chmod(0o644)
    try:
        yield path
    finally:
        shutil.rmtree(folder)


def running(config: Path, *, as_nogroup: bool) -> subprocess.Popen[bytes]:
    def start() -> None:
        # What a shell with `ulimit -c unlimited` hands its commands: the command must lower it.
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        if as_nogroup:
            os.setgroups([])
            os.setgid(NOGROUP)

    return subprocess.Popen(
        [sys.executable, "-m", "farmkeys", "status", "--config", str(config)],
        cwd=REPO,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=start,
    )


def core_limit(pid: int) -> str:
    """The soft and hard core limits of ``pid`` as /proc shows them ("0 0", "unlimited ...")."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return " ".join(line.split()[4:6])
    raise AssertionError(f"no core limit in /proc/{pid}/limits")


def started(proc: subprocess.Popen[bytes]) -> str:
    """The core limit once the command has set it (it starts unlimited); at most 20 s."""
    deadline = time.monotonic() + 20.0
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the command exited {proc.returncode}"
        limit = core_limit(proc.pid)
        if limit == "0 0":
            return limit
        time.sleep(0.05)
    return core_limit(proc.pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="raising the hard core limit needs root")
def test_a_command_sets_its_core_limit_to_zero_whatever_it_was_given(config_file: Path) -> None:
    proc = running(config_file, as_nogroup=False)
    try:
        assert started(proc) == "0 0"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a command in another group needs root")
def test_a_command_is_not_dumpable_so_its_account_cannot_trace_or_read_it(
    config_file: Path,
) -> None:
    proc = running(config_file, as_nogroup=True)
    try:
        assert started(proc) == "0 0"  # set after the dumpable flag was cleared
        status = Path(f"/proc/{proc.pid}/status")
        gids = next(line for line in status.read_text().splitlines() if line.startswith("Gid:"))
        assert gids.split()[1] == str(NOGROUP)  # it runs in nogroup ...
        assert status.stat().st_gid == 0  # ... yet its /proc files are root's: not dumpable
    finally:
        proc.kill()
        proc.wait()
