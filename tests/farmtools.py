"""A farm under test: config files for several nodes against the real servers, and a CLI runner."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farmkeys import cli
from farmkeys._slapd import LocalSlapd

REPO = Path(__file__).resolve().parent.parent


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

    def config(self, node: str = "node-a", **sections: dict[str, Any]) -> Path:
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
        env = {k: v for k, v in os.environ.items() if not k.startswith("FARMKEYS_")}
        config = self.config(node, **sections)
        proc = subprocess.run(
            [sys.executable, "-m", "farmkeys", *args, "--config", str(config)],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            preexec_fn=preexec,
            timeout=120,
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
    from farmkeys.node import new_certificate

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
    return row.thumbprint


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
