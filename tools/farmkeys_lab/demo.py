"""A local demo farm on real parts: PostgreSQL and OpenLDAP on loopback.

``make demo`` runs this. It starts a private slapd and a private PostgreSQL
cluster under ``.demo/`` (the machine's own PostgreSQL, if any, is never
touched), creates the database ``farmkeys_demo`` in it, writes a config file
for three nodes, then runs the real command
line: ``farmkeys init``, ``farmkeys sync`` on every node, ``farmkeys serve``
on every node in the background, ``farmkeys rollover --purpose signing``
(answered by whichever node leads, and installed by all within a second),
``farmkeys status`` and ``farmkeys events``; node-a also publishes over HTTP,
and the demo fetches its SAML metadata, JWKS and health as a relying party and
a load balancer would. Everything listens on 127.0.0.1; the services, slapd and
PostgreSQL are stopped at the end.

With ``DEMO_DATABASE_DSN`` set, the demo uses that database of an existing
PostgreSQL (empty, or holding a farm "contoso" from an earlier demo) instead of
starting a cluster of its own.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg

from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.slapd import LocalSlapd

DATABASE = "farmkeys_demo"
NODES = ("node-a", "node-b", "node-c")  # three: _wait_for_leader counts them


def _write_config(root: Path, slapd: LocalSlapd, dsn: str, node: str, publish: str = "") -> Path:
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
{publish}""",
        encoding="utf-8",
    )
    return path


def _farmkeys(*args: str, config: Path) -> int:
    argv = [sys.executable, "-m", "farmkeys", *args, "--config", str(config)]
    print(f"\n$ farmkeys {' '.join(args)} --config {shlex.quote(str(config))}", flush=True)
    return subprocess.run(argv, check=False).returncode


def _start_services(root: Path, configs: dict[str, Path]) -> list[subprocess.Popen[bytes]]:
    """`farmkeys serve` on every node, as their service managers would run it."""
    print("\n$ farmkeys serve  (on each node, in the background)", flush=True)
    services = []
    for node, config in configs.items():
        log = (root / f"{node}.log").open("wb")
        services.append(
            subprocess.Popen(
                [sys.executable, "-m", "farmkeys", "serve", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return services


def _poll(dsn: str, query: str, *, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(query).fetchone()
            if row and row[0]:
                return True
            time.sleep(0.2)
    return False


def _wait_for_leader(dsn: str) -> bool:
    return _poll(
        dsn, "SELECT holder IS NOT NULL AND expires_at > now() FROM leader_lease"
    ) and _poll(dsn, "SELECT count(*) = 3 FROM node WHERE heartbeat_at IS NOT NULL")


def _wait_for_nodes(dsn: str) -> bool:
    """Every node has installed the live set, and opened it with the current master key."""
    return _poll(
        dsn,
        "SELECT bool_and(n.installed @> live.set AND live.set @> n.installed"
        "  AND n.master_keys = ARRAY[(SELECT id FROM master_key WHERE state = 'current')])"
        " FROM node n,"
        " (SELECT jsonb_agg(jsonb_build_object('purpose', purpose, 'role', role,"
        "  'thumbprint', thumbprint)) AS set FROM certificate WHERE role <> 'archived') live",
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _fetch(url: str) -> None:
    """GET one of node-a's endpoints and show its head, as a relying party would see it."""
    print(f"\n$ curl {url}", flush=True)
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        body = response.read().decode()
        print(f"HTTP {response.status}  ETag {response.headers.get('ETag')}")
    lines = body.splitlines()
    print("\n".join(line[:110] for line in lines[:8]) + ("\n..." if len(lines) > 8 else ""))


def main() -> int:
    root = Path(".demo").resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(mode=0o700)
    print(f"demo farm in {root}")
    with contextlib.ExitStack() as stack:
        slapd = stack.enter_context(LocalSlapd(root / "slapd"))
        print(f"directory: private slapd at {slapd.url} (suffix {slapd.suffix})")
        dsn = _config_db(stack, root)
        port = _free_port()
        publish = (
            f'[publish]\nlisten = "127.0.0.1:{port}"\n'
            'entity_id = "https://fs.contoso.example/adfs/services/trust"\n'
            'sso_url = "https://fs.contoso.example/adfs/ls/"\nrelying_parties = ["rp1"]\n'
        )
        configs = {
            node: _write_config(root, slapd, dsn, node, publish if node == "node-a" else "")
            for node in NODES
        }
        steps = [("init", configs["node-a"]), ("init", configs["node-b"])]
        steps += [("sync", configs[node]) for node in NODES]
        for command, config in steps:
            if _farmkeys(command, config=config) != 0:
                print(f"demo: `farmkeys {command}` failed", file=sys.stderr)
                return 1
        code = _serving(root, configs, dsn, port)
        if code is None:
            return 1
        print(f"\nservice logs: {root}/<node>.log")
        _show_stores(root)
        return code


def _config_db(stack: contextlib.ExitStack, root: Path) -> str:
    """The DSN of the demo's config DB: DEMO_DATABASE_DSN's, or a private cluster's."""
    dsn = os.environ.get("DEMO_DATABASE_DSN", "")
    if dsn:
        print("config DB: the existing database DEMO_DATABASE_DSN names")
        return dsn
    postgres = stack.enter_context(LocalPostgres(root / "postgres"))
    dsn = postgres.create_database(DATABASE)
    print(f"config DB: {DATABASE} on a private PostgreSQL at 127.0.0.1:{postgres.port}")
    return dsn


def _serving(root: Path, configs: dict[str, Path], dsn: str, port: int) -> int | None:
    """With every node serving: roll over, fetch node-a's documents, show status and events.

    ``status``'s exit code, or None when a step failed (said on stderr). The services
    are stopped before it returns, whatever happened.
    """
    services = _start_services(root, configs)
    try:
        if not _wait_for_leader(dsn):
            print("demo: no node took the leader lease", file=sys.stderr)
            return None
        for args in (("--purpose", "signing"), ("--master-key",)):
            if _farmkeys("rollover", *args, config=configs["node-c"]) != 0:
                print(f"demo: `farmkeys rollover {' '.join(args)}` failed", file=sys.stderr)
                return None
        _wait_for_nodes(dsn)
        base = f"http://127.0.0.1:{port}"
        for path in (
            "/FederationMetadata/2007-06/FederationMetadata.xml?rp=rp1",
            "/adfs/discovery/keys",
            "/healthz",
        ):
            _fetch(base + path)
        code = _farmkeys("status", config=configs["node-a"])
        print(f"\nstatus exit code {code} (0 ok, 1 warning, 2 critical, 3 unknown)")
        _farmkeys("events", config=configs["node-a"])
        return code
    finally:
        for process in services:
            process.send_signal(signal.SIGTERM)
        for process in services:
            process.wait(timeout=30)


def _show_stores(root: Path) -> None:
    """What each node's store holds, as a line per node."""
    for node in NODES:
        store = root / "stores" / node
        files = sorted(
            f"{purpose}/{p.name}"
            for purpose in ("signing", "decryption")
            for p in (store / purpose).iterdir()
            if p.name.startswith(("primary", "secondary"))
        )
        print(f"store of {node} ({store}): manifest.json, {', '.join(files)}")


if __name__ == "__main__":
    sys.exit(main())
