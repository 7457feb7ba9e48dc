"""A local demo farm on real parts: PostgreSQL and OpenLDAP on loopback.

``make demo`` runs this. It starts a private slapd under ``.demo/``, creates
the database ``farmkeys_demo`` on the local PostgreSQL (dropping an earlier
demo's), writes a config file for three nodes, then runs the real command
line: ``farmkeys init``, ``farmkeys sync`` on every node, ``farmkeys status``.
Everything listens on 127.0.0.1; slapd is stopped at the end.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg

from farmkeys._slapd import LocalSlapd

ADMIN_DSN = os.environ.get("FARMKEYS_DEMO_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASE = "farmkeys_demo"
NODES = ("node-a", "node-b", "node-c")


def _recreate_database() -> str:
    with psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{DATABASE}"')
    info = psycopg.conninfo.conninfo_to_dict(ADMIN_DSN)
    info["dbname"] = DATABASE
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})


def _write_config(root: Path, slapd: LocalSlapd, dsn: str, node: str) -> Path:
    password_file = slapd.write_password_file(root / "directory.password")
    path = root / f"{node}.toml"
    path.write_text(
        f"""# farmkeys demo: node {node}
[farm]
name = "contoso"
[node]
id = "{node}"
store = "{root / "stores" / node}"
[database]
dsn = "{dsn}"
[directory]
url = "{slapd.url}"
bind_dn = "{slapd.service_dn}"
password_file = "{password_file}"
container = "{slapd.container}"
layout = "openldap"
[policy]
key = "rsa-2048"
certificate_duration = 365
""",
        encoding="utf-8",
    )
    return path


def _farmkeys(*args: str, config: Path) -> int:
    argv = [sys.executable, "-m", "farmkeys", *args, "--config", str(config)]
    print(f"\n$ farmkeys {' '.join(args)} --config {shlex.quote(str(config))}", flush=True)
    return subprocess.run(argv, check=False).returncode


def main() -> int:
    root = Path(".demo").resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(mode=0o700)
    print(f"demo farm in {root}")
    with LocalSlapd(root / "slapd") as slapd:
        print(f"directory: private slapd at {slapd.url} (suffix {slapd.suffix})")
        dsn = _recreate_database()
        print(f"config DB: {DATABASE} on {ADMIN_DSN.rsplit('/', 1)[0]}")
        configs = {node: _write_config(root, slapd, dsn, node) for node in NODES}
        steps = [("init", configs["node-a"]), ("init", configs["node-b"])]
        steps += [("sync", configs[node]) for node in NODES]
        for command, config in steps:
            if _farmkeys(command, config=config) != 0:
                print(f"demo: `farmkeys {command}` failed", file=sys.stderr)
                return 1
        code = _farmkeys("status", config=configs["node-a"])
        print(f"\nstatus exit code {code} (0 ok, 1 warning, 2 critical, 3 unknown)")
        for node in NODES:
            store = root / "stores" / node
            files = sorted(
                f"{purpose}/{p.name}"
                for purpose in ("signing", "decryption")
                for p in (store / purpose).iterdir()
                if p.name.startswith(("primary", "secondary"))
            )
            print(f"store of {node} ({store}): manifest.json, {', '.join(files)}")
        return code


if __name__ == "__main__":
    sys.exit(main())
