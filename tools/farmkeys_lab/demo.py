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
a load balancer would (a summary of each document's keys; a short one whole). Everything
listens on 127.0.0.1; the services, slapd and PostgreSQL are stopped at the end, and the
demo says so: ``make lab`` (:mod:`farmkeys_lab.lab`) keeps servers running.

With ``DEMO_DATABASE_DSN`` set, the demo uses that database of an existing
PostgreSQL (empty, or holding a farm "contoso" from an earlier demo) instead of
starting a cluster of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from xml.etree import ElementTree

import psycopg

from farmkeys_lab.nodes import publish_section, write_node_config
from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.servers import free_port
from farmkeys_lab.slapd import LocalSlapd

DATABASE = "farmkeys_demo"
NODES = ("node-a", "node-b", "node-c")  # three: _wait_for_leader counts them


def _write_config(root: Path, slapd: LocalSlapd, dsn: str, node: str, publish: str = "") -> Path:
    heading = (
        f"farmkeys demo: node {node}. The demo's servers stop when it ends, so this file then"
        " points at nothing; `make lab` starts servers that keep running."
    )
    return write_node_config(
        root, node=node, slapd=slapd, dsn=dsn, heading=heading, publish=publish
    )


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


def _fetch(url: str) -> None:
    """GET one of node-a's endpoints and say what came back, as a relying party would see it."""
    print(f"\n$ curl {url}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
            status, headers, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:  # 503 from /healthz, say: still worth showing
        status, headers, body = exc.code, exc.headers, exc.read()
    path = urllib.parse.urlsplit(url).path
    print("\n".join(describe_answer(path, status, headers.get("ETag"), body)), flush=True)


# A document up to this long is printed whole; a longer one is summarised, never cut.
WHOLE_DOCUMENT_BYTES = 2000
_MD = "{urn:oasis:names:tc:SAML:2.0:metadata}"
_DS = "{http://www.w3.org/2000/09/xmldsig#}"


def describe_answer(path: str, status: int, etag: str | None, body: bytes) -> list[str]:
    """The lines the demo prints for an HTTP answer: its status, its ETag when it has one,
    then the body whole if it is short, else a summary of what it holds (the SAML
    metadata's and the JWKS's keys), so nothing printed is a cut-off document."""
    head = f"HTTP {status}" + (f", ETag {etag}" if etag else "")
    size = f"{len(body):,} bytes"
    if status == 200 and path.endswith("FederationMetadata.xml"):
        return [head, *_describe_metadata(body, size)]
    if status == 200 and path == "/adfs/discovery/keys":
        return [head, *_describe_jwks(body, size)]
    if len(body) <= WHOLE_DOCUMENT_BYTES:
        return [head, body.decode("utf-8", "replace").rstrip("\n")]
    return [head, f"{size}, not shown"]


def _describe_metadata(body: bytes, size: str) -> list[str]:
    # Our own node's answer on loopback, and ElementTree expands no external entity.
    root = ElementTree.fromstring(body)  # noqa: S314
    # The IDPSSODescriptor's keys: the WS-Federation role lists the same signing keys again.
    keys = [
        (descriptor.get("use", "any"), descriptor.findtext(f"{_DS}KeyInfo/{_DS}KeyName", "?"))
        for descriptor in root.iterfind(f"{_MD}IDPSSODescriptor/{_MD}KeyDescriptor")
    ]
    signing = sum(use == "signing" for use, _ in keys)
    encryption = sum(use == "encryption" for use, _ in keys)
    signed = ", signed" if root.find(f"{_DS}Signature") is not None else ""
    lines = [
        f"SAML metadata of {root.get('entityID', '(no entityID)')}:"
        f" {_count(signing, 'signing key')},"
        f" {_count(encryption, 'encryption key')}, {size}{signed}"
    ]
    lines += [f"  {use:<10}  {name}" for use, name in keys]
    return lines


def _describe_jwks(body: bytes, size: str) -> list[str]:
    keys = json.loads(body)["keys"]
    lines = [f"JWKS: {_count(len(keys), 'key')}, {size}"]
    lines += [
        f"  kid {key.get('kid', '-')}  {key.get('kty', '-')} {key.get('alg', '-')}"
        f"  use {key.get('use', '-')}"
        for key in keys
    ]
    return lines


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'' if number == 1 else 's'}"


def main() -> int:
    root = Path(".demo").resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(mode=0o700)
    print(f"demo farm in {root}")
    with contextlib.ExitStack() as stack:
        code = _run(stack, root)
        print("\nstopping slapd" + ("" if _existing_database() else " and PostgreSQL"), flush=True)
    print(_ending(root))
    return code


def _existing_database() -> bool:
    return bool(os.environ.get("DEMO_DATABASE_DSN"))


def _ending(root: Path) -> str:
    """The demo's last words: what is gone, and how to get servers that stay."""
    servers = "its slapd is" if _existing_database() else "its slapd and PostgreSQL are"
    return (
        f"\nThe demo is over: {servers} stopped, so the configs in {root} point at servers"
        " that are gone (the logs stay).\n"
        "For a lab that keeps running, with two node configs to try farmkeys on by hand:"
        " make lab"
    )


def _run(stack: contextlib.ExitStack, root: Path) -> int:
    """The demo with its servers in ``stack``: the exit code of ``main``."""
    slapd = stack.enter_context(LocalSlapd(root / "slapd"))
    print(f"directory: private slapd at {slapd.url} (suffix {slapd.suffix})")
    dsn = _config_db(stack, root)
    port = free_port()
    publish = publish_section(port)
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
        config = shlex.quote(str(configs["node-a"]))
        print(f"\nthe whole documents: farmkeys metadata --config {config}")
        print(f"                     farmkeys jwks --config {config}")
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
