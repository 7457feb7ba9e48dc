"""A lab to try farmkeys by hand: private servers that keep running until Ctrl-C.

``make lab`` (``python -m farmkeys_lab up [--dir DIR]``, tools/ on ``PYTHONPATH``)
starts a private slapd and a private PostgreSQL cluster in a folder of their own
(``lab/`` of the checkout by default), each on a free port of 127.0.0.1, runs
``farmkeys init`` once, writes the configs of two nodes (node-a, which also
publishes over HTTP, and node-b) with their stores, and prints them and the
commands to try. Then it waits. SIGINT (Ctrl-C) or SIGTERM stops both servers,
deletes the cluster's data and the node configs (they would point at nothing),
keeps the logs, says so and exits 0.

The folder is the lab's: a second lab on the same folder while one runs is
refused in one line (an flock on ``<dir>/lab.lock``); another folder gives
another lab, on other ports. A folder an earlier lab left is cleared first,
and servers an earlier lab left running (it was killed outright) are stopped.
A folder that holds files but no ``lab.lock`` is refused, never cleared.

The lab's passwords are random and throwaway: the directory's is in
``directory.password`` and the config DB's in ``postgres/pgpass`` (both 0600),
which the configs name, so neither config holds a secret and nothing printed
shows one. Nothing here is meant for production.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from farmkeys_lab.nodes import PASSWORD_FILE, publish_section, store_of, write_node_config
from farmkeys_lab.postgres import LocalPostgres, PostgresError
from farmkeys_lab.servers import accepts, free_port
from farmkeys_lab.slapd import LocalSlapd, SlapdError

DATABASE = "farmkeys_lab"
NODES = ("node-a", "node-b")
LOCK_NAME = "lab.lock"
# What the running lab's servers are, so a later lab can stop them if this one was killed.
SERVERS_NAME = "servers.json"
# How often the waiting lab looks at its servers (and at a signal's flag).
WATCH_SECONDS = 0.2
# How long a leftover server of a killed lab gets to stop on its signal before SIGKILL.
LEFTOVER_STOP_SECONDS = 30.0
READY = "lab ready"


class LabError(RuntimeError):
    """Why the lab cannot start, in one line for the operator."""


class _Signals:
    """Remembers a SIGINT or SIGTERM instead of dying of it; the lab then stops in order."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum


def up(root: Path) -> int:
    """Run the lab in ``root`` until SIGINT or SIGTERM; 0 after a clean stop, else 1."""
    signals = _Signals()
    root = Path(os.path.abspath(root))
    try:
        lock = _claim(root)
    except LabError as exc:
        print(f"farmkeys-lab: error: {exc}", file=sys.stderr)
        return 1
    try:
        return _run(root, signals)
    except (LabError, SlapdError, PostgresError) as exc:
        print(f"farmkeys-lab: error: {exc}", file=sys.stderr)
        return 1
    finally:
        os.close(lock)  # drops the flock; lab.lock stays, marking the folder a lab's


def _run(root: Path, signals: _Signals) -> int:
    say(
        f"farmkeys lab in {root}: a throwaway farm to try farmkeys on by hand. Its passwords"
        " are random lab passwords, kept in files here; nothing in it is fit for production."
    )
    try:
        with contextlib.ExitStack() as stack:
            slapd = stack.enter_context(LocalSlapd(root / "slapd"))
            say(f"directory: slapd at {slapd.url}, suffix {slapd.suffix}, pid {slapd.pid}")
            postgres = stack.enter_context(LocalPostgres(root / "postgres"))
            say(f"config DB: PostgreSQL at 127.0.0.1:{postgres.port}, pid {postgres.pid}")
            servers = {
                "slapd": (slapd.port, slapd.pid),
                "PostgreSQL": (postgres.port, postgres.pid),
            }
            _record_servers(root, slapd, postgres)
            dsn = postgres.create_database(DATABASE)
            port = free_port()
            configs = {
                node: write_node_config(
                    root,
                    node=node,
                    slapd=slapd,
                    dsn=dsn,
                    heading=f"farmkeys lab: node {node}. Valid while the lab in {root} runs.",
                    publish=publish_section(port) if node == "node-a" else "",
                )
                for node in NODES
            }
            if signals.received is None:
                _init(configs["node-a"], signals)
            if signals.received is None:
                _guide(root, configs, slapd, postgres, dsn, port)
            code = _wait(signals, slapd, postgres)
            say("\nstopping slapd and PostgreSQL")
    finally:
        _forget(root)
    stopped = _stopped(root, servers)
    return code or stopped


def _init(config: Path, signals: _Signals) -> None:
    say(f"\n$ farmkeys init --config {shlex.quote(str(config))}")
    done = subprocess.run(
        [sys.executable, "-m", "farmkeys", "init", "--config", str(config)], check=False
    )
    if done.returncode != 0 and signals.received is None:  # not a Ctrl-C that reached it
        raise LabError(f"`farmkeys init` failed with exit code {done.returncode} (above)")


def _guide(
    root: Path,
    configs: dict[str, Path],
    slapd: LocalSlapd,
    postgres: LocalPostgres,
    dsn: str,
    port: int,
) -> None:
    """Print the configs, the commands to try with them, where the logs are, how to stop."""
    say("\nnode configs:")
    for node, config in configs.items():
        say(f"  {node}  {config}  store {store_of(root, node)}")
    for config in configs.values():
        say(f"\n--- {config} ---\n{config.read_text(encoding='utf-8').rstrip()}")
    farmkeys = _farmkeys_command()
    a, b = (f"{farmkeys} --config {shlex.quote(str(configs[node]))}" for node in NODES)
    log_a, log_b = (shlex.quote(str(root / f"{node}.log")) for node in NODES)
    account = pwd.getpwuid(os.geteuid()).pw_name
    lines = [
        f"try, in another terminal, as {account} (the stores are its):",
        "  # install the farm's certificates in node-a's store, then see the farm at a glance",
        f"  {a} sync",
        f"  {a} status",
        "  # each node's service: one leads; each keeps its store current and logs to stderr",
        f"  {a} serve 2>{log_a} &",
        f"  {b} serve 2>{log_b} &",
        "  # a signing rollover, answered by the leader (a serve must run)",
        f"  {b} rollover --purpose signing",
        "  # node-a's SAML metadata, while it serves",
        f"  curl http://127.0.0.1:{port}/FederationMetadata/2007-06/FederationMetadata.xml",
        "  # the config DB (its password is in the passfile the DSN names)",
        f"  psql {shlex.quote(dsn)}",
        f"logs: a serve's go to its stderr (the .log files above); slapd's to"
        f" {slapd.log_path}, PostgreSQL's to {postgres.log_path}",
        "stop the serve processes before the lab: they would wait for servers that are gone",
    ]
    say("\n" + "\n".join(lines))
    say(
        f"\n{READY}: slapd and PostgreSQL run until Ctrl-C here (or kill -INT {os.getpid()});"
        " then both stop and the node configs are removed"
    )


def _wait(signals: _Signals, slapd: LocalSlapd, postgres: LocalPostgres) -> int:
    """Wait for a signal (0), or until a server dies (1, said on stderr)."""
    while signals.received is None:
        for name, server in (("slapd", slapd), ("PostgreSQL", postgres)):
            if not server.running:
                print(
                    f"farmkeys-lab: error: {name} stopped by itself; its log is {server.log_path}",
                    file=sys.stderr,
                )
                return 1
        time.sleep(WATCH_SECONDS)
    return 0


def _stopped(root: Path, servers: dict[str, tuple[int, int | None]]) -> int:
    """Say the servers are gone (port closed, process gone): 0, or 1 if one is not."""
    left = [
        f"{name} (pid {pid}, port {port})"
        for name, (port, pid) in servers.items()
        if accepts(port) or (pid is not None and Path(f"/proc/{pid}").exists())
    ]
    if left:
        print(f"farmkeys-lab: error: still running: {', '.join(left)}", file=sys.stderr)
        return 1
    stopped = " and ".join(f"{name} (pid {pid})" for name, (_, pid) in servers.items())
    say(
        f"stopped {stopped}; the cluster's data, the node configs and the password file are"
        f" deleted, the logs kept in {root}. `make lab` starts a fresh lab."
    )
    return 0


# -- the folder ---------------------------------------------------------------------------


def _claim(root: Path) -> int:
    """Lock ``root`` for this lab (made if missing) and clear what an earlier lab left.

    The descriptor holding the flock; LabError when another lab holds it, or ``root`` is
    not a folder a lab may use.
    """
    if root.exists() and not root.is_dir():
        raise LabError(f"{root} is not a folder; give --dir a folder of the lab's own")
    lock_path = root / LOCK_NAME
    if root.is_dir() and any(root.iterdir()) and not lock_path.exists():
        raise LabError(
            f"{root} holds files but is not a lab's folder (no {LOCK_NAME}); give --dir an"
            " empty or new folder"
        )
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "pid unknown"
        os.close(fd)
        raise LabError(
            f"a lab already runs in {root} ({holder}); stop it with Ctrl-C in its terminal,"
            " or start another in another folder (--dir, or make lab LAB_DIR=...)"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        os.chmod(root, 0o700)  # not group- or other-writable, as farmkeys wants a store's
        _stop_leftovers(root)
        for entry in root.iterdir():
            if entry.name == LOCK_NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    except BaseException:
        os.close(fd)
        raise
    return fd


def _record_servers(root: Path, slapd: LocalSlapd, postgres: LocalPostgres) -> None:
    """Note each server's pid and a word of its command line only it has."""
    data = (root / "postgres" / "data").resolve()
    record = {
        "slapd": {"pid": slapd.pid, "mark": str(slapd.conf_path)},
        "postgres": {"pid": postgres.pid, "mark": str(data), "data": str(data)},
    }
    (root / SERVERS_NAME).write_text(json.dumps(record), encoding="utf-8")


def _stop_leftovers(root: Path) -> None:
    """Stop the servers an earlier lab in ``root`` left running, and delete their data."""
    try:
        record = json.loads((root / SERVERS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for name, sig in (("slapd", signal.SIGTERM), ("postgres", signal.SIGINT)):
        server = record.get(name) or {}
        pid, mark = server.get("pid"), server.get("mark")
        if isinstance(pid, int) and isinstance(mark, str) and _runs(pid, mark):
            say(f"stopping the {name} (pid {pid}) an earlier lab here left running")
            os.kill(pid, sig)
            deadline = time.monotonic() + LEFTOVER_STOP_SECONDS
            while _runs(pid, mark) and time.monotonic() < deadline:
                time.sleep(WATCH_SECONDS)
            if _runs(pid, mark):
                os.kill(pid, signal.SIGKILL)
    data = (record.get("postgres") or {}).get("data")
    if isinstance(data, str) and Path(data).name == "data":
        # As root the cluster lives in a /tmp/farmkeys-pg-* folder outside the lab's.
        parent = Path(data).parent
        if parent.name.startswith("farmkeys-pg-") or parent == root / "postgres":
            shutil.rmtree(parent, ignore_errors=True)


def _runs(pid: int, mark: str) -> bool:
    """Whether ``pid`` is alive (not a zombie) and ``mark`` is in its command line."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        return False
    return state not in ("Z", "X") and mark in cmdline


def _forget(root: Path) -> None:
    """Remove what points at the stopped servers: the node configs, the directory password
    file and the server record."""
    names = (*(f"{node}.toml" for node in NODES), PASSWORD_FILE, SERVERS_NAME)
    for path in (root / name for name in names):
        path.unlink(missing_ok=True)


# -- small things -----------------------------------------------------------------------


def say(text: str) -> None:
    """Print ``text`` at once: whoever reads the lab's output waits for its lines."""
    print(text, flush=True)


def _farmkeys_command() -> str:
    """The farmkeys of this Python, as a command an operator can paste."""
    script = Path(sys.executable).parent / "farmkeys"
    if script.is_file():
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m farmkeys"
