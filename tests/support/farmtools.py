"""A farm under test: config files for several nodes against the real servers, and a CLI runner."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import psycopg

from farmkeys import cli
from farmkeys_lab.slapd import LocalSlapd

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class TestFarm:
    """Three nodes of farm "contoso" on one throwaway database and the session slapd."""

    __test__ = False  # not a test class, whatever its name

    root: Path
    slapd: LocalSlapd
    dsn: str
    name: str = "contoso"
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def store(self, node: str = "node-a") -> Path:
        return self.root / "stores" / node

    def config(self, node: str = "node-a", /, **sections: dict[str, Any]) -> Path:
        """Write the TOML config of ``node``, ``sections`` overriding the defaults; its path."""
        password_file = self.slapd.write_password_file(self.root / "directory.password")
        values: dict[str, dict[str, Any]] = {
            "farm": {"name": self.name},
            "node": {"id": node, "store": str(self.store(node))},
            "database": {"dsn": self.dsn, "connect_timeout_seconds": 2},
            "directory": {
                "url": self.slapd.url,
                "bind_dn": self.slapd.service_dn,
                "password_file": str(password_file),
                "container": self.slapd.container,
                "timeout_seconds": 2,
            },
            "retry": {
                "total_seconds": 1.0,
                "initial_backoff_seconds": 0.05,
                "max_backoff_seconds": 0.2,
            },
        }
        for name, body in {**self.overrides, **sections}.items():
            values.setdefault(name, {}).update(body)
            values[name] = {k: v for k, v in values[name].items() if v is not None}
        path = self.root / f"{node}.toml"
        path.write_text(_toml(values))
        path.chmod(0o600)  # it may hold a password, as other_account() does
        return path

    def other_account(self) -> dict[str, Any]:
        """Directory settings binding as alice, an ordinary account with no rights on ou=dkm."""
        return {
            "bind_dn": self.slapd.other_dn,
            "password": self.slapd.other_password,
            "password_file": None,
        }

    def run(self, *args: str, node: str = "node-a", **sections: dict[str, Any]) -> Result:
        """Run the CLI in this process with ``--config`` for ``node``."""
        out, err = io.StringIO(), io.StringIO()
        argv = [*args, "--config", str(self.config(node, **sections))]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
        return Result(code, out.getvalue(), err.getvalue())

    def spawn(
        self, *args: str, node: str = "node-a", preexec: Any = None, **sections: dict[str, Any]
    ) -> Result:
        """Run the CLI as a separate process, as a service manager would."""
        config = self.config(node, **sections)
        return run_python("-m", "farmkeys", *args, "--config", str(config), preexec=preexec)


def clean_env() -> dict[str, str]:
    """This process's environment without FARMKEYS_* (a child must not take them as config)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FARMKEYS_")}


def run_python(*args: str, preexec: Any = None, timeout: float = 120) -> Result:
    """Run ``python *args`` from the repository with a clean environment; its result."""
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=REPO,
        preexec_fn=preexec,
        timeout=timeout,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def _toml(values: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, body in values.items():
        lines.append(f"[{section}]")
        for key, value in body.items():
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def snapshot(path: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under ``path``: mode and content (files) or target (symlinks)."""
    found: dict[str, tuple[int, bytes | str]] = {}
    if not path.exists():
        return found
    for entry in sorted(path.rglob("*")):
        rel = str(entry.relative_to(path))
        st = entry.lstat()
        if entry.is_symlink():
            found[rel] = (st.st_mode, os.readlink(entry))
        elif entry.is_file():
            found[rel] = (st.st_mode, entry.read_bytes())
        else:
            found[rel] = (st.st_mode, "")
    return found


def one_error_line(result: Result) -> str:
    """The single `farmkeys: error: ... — ...` line a failed command printed."""
    lines = [line for line in result.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("farmkeys: error: ")]
    assert len(errors) == 1, result.err
    assert " — " in errors[0], errors[0]
    return errors[0]


def add_certificate(farm: TestFarm, *, purpose: str, role: str) -> str:
    """Generate a real certificate sealed under the farm's current master key; its thumbprint.

    What the leader's rollover will do, done by hand so tests can change the live set.
    """
    from datetime import UTC, datetime

    from farmkeys.config import load
    from farmkeys.configdb import ConfigDB
    from farmkeys.directory import Directory
    from farmkeys.rollover import new_certificate

    cfg = load(farm.config())
    with ConfigDB(cfg.database, cfg.retry) as db, Directory(cfg.directory, cfg.retry) as dirx:
        found = db.farm()
        assert found is not None
        key_id = dirx.current_key_id(found.dkm_group)
        row = new_certificate(
            cfg,
            dkm_group=found.dkm_group,
            purpose=purpose,
            role=role,
            master_key_id=key_id,
            master_key=dirx.master_key(found.dkm_group, key_id),
            now=datetime.now(UTC),
        )
        with db.transaction() as tx:
            tx.insert_certificate(row)
    seal_state(farm)
    return row.thumbprint


def seal_state(farm: TestFarm) -> int:
    """Write the farm state record for the config DB's live rows, as the leader does after
    a change, under the current master key, one version above any seen; the version.

    For tests that change the live set by hand in the leader's place."""
    from dataclasses import replace

    from farmkeys import farmstate
    from farmkeys.config import load
    from farmkeys.configdb import ConfigDB
    from farmkeys.directory import Directory

    cfg = load(farm.config())
    with ConfigDB(cfg.database, cfg.retry) as db, Directory(cfg.directory, cfg.retry) as dirx:
        found = db.farm()
        assert found is not None
        key_id = dirx.current_key_id(found.dkm_group)
        with db.transaction() as tx:
            version = (
                1
                + tx.execute(
                    "SELECT greatest((SELECT max(version) FROM farm_state),"
                    " (SELECT max(state_version) FROM node), 0) AS v"
                )[0]["v"]
            )
            stored = tx.stored_state()
            before = farmstate.parse(stored.body) if stored is not None else None
            state = farmstate.FarmState.build(
                farm=found.dkm_group,
                version=version,
                term=None,
                master_key=key_id,
                rows=tx.live_certificates(),
                revoked=before.revoked if before is not None else (),
                shredded=before.shredded if before is not None else (),
                answered=before.answered if before is not None else (),
            )
            body, mac = farmstate.seal(replace(state), dirx.master_key(found.dkm_group, key_id))
            tx.write_state(body=body, mac=mac, version=version, term=None)
    return int(version)


def hold_lease(farm: TestFarm, node: str = "node-a", ttl_seconds: float = 600.0) -> int:
    """Take the leader lease as ``node`` for the rest of the test (as `serve` would); the term."""
    from farmkeys.config import LeaseConfig, load
    from farmkeys.configdb import ConfigDB
    from farmkeys.election import Election

    cfg = load(farm.config(node))
    with ConfigDB(cfg.database, cfg.retry) as db:
        election = Election(
            db, node_id=node, lease=LeaseConfig(ttl_seconds=ttl_seconds, renew_seconds=1.0)
        )
        assert election.try_acquire()
        assert election.term is not None
        return election.term


# -- `farmkeys serve` as real processes (tests/test_serve.py, tests/bench/) -----------------


Identity = frozenset[tuple[str, str, str]]  # {(purpose, role, thumbprint)}


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail after ``timeout``.

    The failure names ``what`` was awaited and adds ``detail()`` (logs, last state).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout:.1f} s waiting until {what}{extra}")
        time.sleep(interval)


def db_query(dsn: str, query: str, params: Any = None) -> list[dict[str, Any]]:
    """One query on a fresh connection (so a restarted server costs the caller nothing)."""
    from psycopg.rows import dict_row

    with psycopg.connect(dsn, autocommit=True, connect_timeout=2, row_factory=dict_row) as conn:
        return conn.execute(query, params).fetchall()


def db_now(dsn: str) -> Any:
    """The database's clock."""
    return db_query(dsn, "SELECT now() AS now")[0]["now"]


def lease_row(dsn: str) -> dict[str, Any]:
    """The leader lease as the database sees it, with ``valid`` judged by its clock."""
    return db_query(
        dsn,
        "SELECT holder, holder_node, term, acquired_at, expires_at,"
        " holder IS NOT NULL AND expires_at > now() AS valid FROM leader_lease",
    )[0]


def live_identity(dsn: str) -> Identity:
    """The farm's live (not archived) certificate set in the config DB."""
    rows = db_query(
        dsn, "SELECT purpose, role, thumbprint FROM certificate WHERE role <> 'archived'"
    )
    return frozenset((r["purpose"], r["role"], r["thumbprint"]) for r in rows)


def audit_events(farm: TestFarm) -> list[dict[str, Any]]:
    """The farm's whole audit log, ordered by (at, id): a transaction's events together."""
    return db_query(
        farm.dsn,
        "SELECT id, at, node, term, action, purpose, certificate, thumbprint, master_key,"
        " detail FROM audit_event ORDER BY at, id",
    )


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

    def start(self, node: str, **sections: dict[str, Any]) -> ServeProcess:
        """Start `farmkeys serve` for ``node`` (config sections as for TestFarm.config)."""
        config = self.farm.config(node, **sections)
        env = clean_env()
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
