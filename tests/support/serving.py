"""`farmkeys serve` as real processes (tests/system/, tests/bench/, tests/soak/): the nodes,
their logs, and what their stores install, watched while they serve."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from farmtools import REPO, TestFarm, clean_env, db_query

Identity = frozenset[tuple[str, str, str]]  # {(purpose, role, thumbprint)}


def live_identity(dsn: str) -> Identity:
    """The farm's live (not archived) certificate set in the config DB."""
    rows = db_query(
        dsn, "SELECT purpose, role, thumbprint FROM certificate WHERE role <> 'archived'"
    )
    return frozenset((r["purpose"], r["role"], r["thumbprint"]) for r in rows)


def _manifest_set(doc: dict[str, Any]) -> Identity:
    return frozenset((c["purpose"], c["role"], c["thumbprint"]) for c in doc["certificates"])


def manifest_identity(store: Path) -> Identity | None:
    """What a store's manifest.json says is installed; None when there is none (yet)."""
    try:
        doc = json.loads((store / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return _manifest_set(doc)


# What each leader action in the audit log makes of its certificate (None: no longer live).
ROLE_AFTER: dict[str, str | None] = {
    "generate": "secondary",
    "generate_and_promote": "primary",
    "promote": "primary",
    "retire": "retired",
    "archive": None,
}


def live_sets(found: list[dict[str, Any]]) -> list[tuple[Any, Identity]]:
    """Every live set the farm had, replayed from the audit log: (transaction time, set).

    ``found``: audit events ordered by (at, id); the events of one transaction
    share its ``at``, so each transaction gives one set.
    """
    certs: dict[Any, tuple[str, str, str]] = {}
    sets = []
    steps = [e for e in found if e["certificate"] is not None]
    for at, group in itertools.groupby(steps, key=lambda e: e["at"]):
        for e in group:
            role = ROLE_AFTER[e["action"]]
            if role is None:
                certs.pop(e["certificate"], None)
            else:
                certs[e["certificate"]] = (e["purpose"], role, e["thumbprint"])
        sets.append((at, frozenset(certs.values())))
    return sets


@dataclass
class ServeProcess:
    """One `farmkeys serve` subprocess and its log file (stdout and stderr)."""

    node: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class ServeNodes:
    """`farmkeys serve` on several nodes of a TestFarm, as separate processes.

    Use it as a context manager: every process it started is killed on exit,
    whatever happened (a SIGSTOPped one too).
    """

    def __init__(self, farm: TestFarm, log_dir: Path | None = None) -> None:
        self.farm = farm
        self.log_dir = log_dir or farm.root / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, ServeProcess] = {}
        self._all: list[ServeProcess] = []

    def __enter__(self) -> ServeNodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()

    def start(
        self, node: str, *, env: dict[str, str] | None = None, **sections: dict[str, Any]
    ) -> ServeProcess:
        """Start `farmkeys serve` for ``node`` (config sections as for TestFarm.config;
        ``env``: variables beyond the clean environment, e.g. NOTIFY_SOCKET)."""
        config = self.farm.config(node, **sections)
        env = {**clean_env(), **(env or {})}
        log = self.log_dir / f"{node}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "farmkeys", "serve", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                cwd=REPO,
            )
        started = ServeProcess(node, proc, log)
        self.procs[node] = started
        self._all.append(started)
        return started

    def start_all(self, nodes: Iterable[str], **sections: dict[str, Any]) -> None:
        for node in nodes:
            self.start(node, **sections)

    def by_holder(self, holder: str | None) -> ServeProcess:
        """The process named by a lease holder ("node/host:pid/suffix")."""
        assert holder, f"no holder\n{self.logs()}"
        pid = int(holder.split("/")[1].rsplit(":", 1)[1])
        found = [p for p in self.procs.values() if p.pid == pid]
        assert found, f"lease holder {holder} is none of our processes\n{self.logs()}"
        return found[0]

    def logs(self, lines: int = 25) -> str:
        """The tail of every node's log, for assertion messages."""
        return "\n".join(
            f"--- {p.node} (pid {p.pid}, {'running' if p.alive() else f'exit {p.proc.returncode}'})"
            f" {p.log}:\n{p.tail(lines)}"
            for p in self._all
        )

    def stop(self, node: str, timeout: float = 10.0) -> int:
        """SIGTERM one node and wait for it; its exit code."""
        proc = self.procs[node].proc
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def kill_all(self) -> None:
        for p in self._all:
            if p.proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        p.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(10)


class BackgroundThread:
    """A daemon thread that runs ``_run`` while the ``with`` block lasts; ``_stop`` ends it."""

    name = "background"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), f"the {self.name} thread did not stop"

    def _run(self) -> None:
        raise NotImplementedError


def installed_set(store: Path) -> tuple[float, Identity] | None:
    """What a store has installed and when it switched to it; None before its first install.

    The time is the mtime of the ``current`` link: the store makes that link
    just before it renames it into place, so it is the switch's own time,
    whenever the caller happens to look. Read consistently: the link is
    resolved once and must be the same link after the manifest was read.
    """
    link = store / "current"
    for _ in range(1000):
        try:
            before = os.lstat(link)
            target = os.readlink(link)
            doc = json.loads((store / target / "manifest.json").read_text())
            after = os.lstat(link)
        except FileNotFoundError:
            if not os.path.lexists(link):
                return None  # nothing installed yet
            continue  # the generation read was removed two switches later: look again
        except json.JSONDecodeError:
            continue
        if (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns):
            return before.st_mtime, _manifest_set(doc)
    raise AssertionError(f"{store}: `current` changed under every one of 1000 reads")


class ManifestWatcher(BackgroundThread):
    """A thread that looks at every store every ``interval`` and records each set it switched to.

    ``changes[node]`` is a list of ``(switch time, identity)``, one per newly
    seen set; the switch time is the store's own (see :func:`installed_set`),
    so a watcher that runs late on a loaded machine still records when each
    node really switched. It looks once more after it was told to stop, so a
    switch made just before the ``with`` block ends is never missed.
    """

    name = "manifest-watcher"

    def __init__(self, stores: dict[str, Path], interval: float = 0.02) -> None:
        self.stores = stores
        self.interval = interval
        self.changes: dict[str, list[tuple[float, Identity]]] = {n: [] for n in stores}
        super().__init__()

    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            self._look()
            if stopping:
                return
            self._stop.wait(self.interval)

    def _look(self) -> None:
        for node, store in self.stores.items():
            seen = installed_set(store)
            if seen is not None and (
                not self.changes[node] or self.changes[node][-1][1] != seen[1]
            ):
                self.changes[node].append(seen)

    def current(self, node: str) -> Identity | None:
        return self.changes[node][-1][1] if self.changes[node] else None
