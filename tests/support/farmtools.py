"""A farm under test: config files for several nodes against the real servers, and a CLI runner."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from farmkeys import cli
from farmkeys_lab.slapd import LocalSlapd

if TYPE_CHECKING:
    import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    """What a command did: its exit code, stdout and stderr, and its command line."""

    code: int
    out: str
    err: str
    command: tuple[str, ...] = ()  # for failure messages; () when not known

    @property
    def json(self) -> Any:
        return json.loads(self.out)


# How much of a failed command's stdout expect_ok shows: its end, where the error is.
STDOUT_TAIL_LINES = 20


def expect_ok(result: Result) -> Result:
    """``result``, once its command is known to have exited 0.

    Otherwise the test fails with the command, its exit code, its stderr and the
    tail of its stdout, so the failure says why rather than ``1 != 0``.
    """
    __tracebackhide__ = True  # the failure points at the caller's line
    if result.code != 0:
        command = shlex.join(result.command) if result.command else "the command"
        out = "\n".join(result.out.splitlines()[-STDOUT_TAIL_LINES:])
        raise AssertionError(
            f"{command} exited {result.code}, not 0\n"
            f"--- stderr:\n{result.err.rstrip() or '(empty)'}\n"
            f"--- stdout (last {STDOUT_TAIL_LINES} lines):\n{out or '(empty)'}"
        )
    return result


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
        return Result(code, out.getvalue(), err.getvalue(), ("farmkeys", *argv))

    def spawn(
        self, *args: str, node: str = "node-a", preexec: Any = None, **sections: dict[str, Any]
    ) -> Result:
        """Run the CLI as a separate process, as a service manager would."""
        config = self.config(node, **sections)
        return run_python("-m", "farmkeys", *args, "--config", str(config), preexec=preexec)


def run_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> Result:
    """Run the CLI in this process with ``argv``, its output captured by ``capsys``."""
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err, ("farmkeys", *argv))


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
    return Result(proc.returncode, proc.stdout, proc.stderr, ("python", *args))


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
    from farmkeys.db import ConfigDB
    from farmkeys.directory import Directory
    from farmkeys.leader import new_certificate

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


def leader_check(farm: TestFarm, **sections: dict[str, Any]) -> list[str]:
    """One rollover check by a leader in this process (it takes the lease and gives it
    back); what it did, as "<action> <purpose>" ("promote signing")."""
    from farmkeys.config import load
    from farmkeys.db import ConfigDB
    from farmkeys.directory import Directory
    from farmkeys.election import Election
    from farmkeys.leader import Leader

    config = load(farm.config(**sections))
    with (
        ConfigDB(config.database, config.retry) as db,
        Directory(config.directory, config.retry) as directory,
    ):
        election = Election(db, node_id="node-a", lease=config.lease)
        assert election.try_acquire()
        try:
            return [
                f"{a.action} {a.purpose}" for a in Leader(config, db, directory, election).check()
            ]
        finally:
            election.release()


def seal_state(farm: TestFarm) -> int:
    """Write the farm state record for the config DB's live rows, as the leader does after
    a change, under the current master key, one version above any seen; the version.

    For tests that change the live set by hand in the leader's place."""
    from dataclasses import replace

    from farmkeys.config import load
    from farmkeys.db import ConfigDB
    from farmkeys.directory import Directory
    from farmkeys.formats import farm_state

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
            before = farm_state.parse(stored.body) if stored is not None else None
            state = farm_state.FarmState.build(
                farm=found.dkm_group,
                version=version,
                term=None,
                master_key=key_id,
                rows=tx.live_certificates(),
                revoked=before.revoked if before is not None else (),
                shredded=before.shredded if before is not None else (),
                answered=before.answered if before is not None else (),
                promotions=before.promotions if before is not None else (),
                holds=before.holds if before is not None else (),
            )
            body, mac = farm_state.seal(replace(state), dirx.master_key(found.dkm_group, key_id))
            tx.write_state(body=body, mac=mac, version=version, term=None)
    return int(version)


def hold_lease(farm: TestFarm, node: str = "node-a", ttl_seconds: float = 600.0) -> int:
    """Take the leader lease as ``node`` for the rest of the test (as `serve` would); the term."""
    from farmkeys.config import LeaseConfig, load
    from farmkeys.db import ConfigDB
    from farmkeys.election import Election

    cfg = load(farm.config(node))
    with ConfigDB(cfg.database, cfg.retry) as db:
        election = Election(
            db, node_id=node, lease=LeaseConfig(ttl_seconds=ttl_seconds, renew_seconds=1.0)
        )
        assert election.try_acquire()
        assert election.term is not None
        return election.term


# -- waiting, and reading the config DB as a test would ----------------------------------


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


def audit_events(farm: TestFarm) -> list[dict[str, Any]]:
    """The farm's whole audit log, ordered by (at, id): a transaction's events together."""
    return db_query(
        farm.dsn,
        "SELECT id, at, node, term, action, purpose, certificate, thumbprint, master_key,"
        " detail FROM audit_event ORDER BY at, id",
    )
