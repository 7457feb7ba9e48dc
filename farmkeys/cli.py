"""The `farmkeys` command: a thin shell over :mod:`farmkeys.node`.

Expected failures (every :class:`farmkeys.errors.Error`) print one line,
``farmkeys: error: <what is wrong> — <what to do>``, to stderr and exit 1;
``--debug`` adds the traceback. `status` exits 0 / 1 / 2 for ok / warning /
critical, and 3 when it cannot tell because the config DB is out of reach.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

from farmkeys import __version__, node
from farmkeys import config as config_module
from farmkeys.config import Config
from farmkeys.configdb import ConfigDB
from farmkeys.directory import Directory
from farmkeys.errors import DatabaseError, Error
from farmkeys.store import Store

log = logging.getLogger("farmkeys")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 64  # sysexits' EX_USAGE: apart from status's 0-3
STATUS_EXIT = {"ok": 0, "warning": 1, "critical": 2}
STATUS_UNKNOWN = 3


def _now() -> datetime:
    return datetime.now(UTC)


class _Parser(argparse.ArgumentParser):
    """argparse, exiting with EXIT_USAGE so a typo never reads as `status` critical (2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"farmkeys: error: {message} — see `farmkeys --help`\n")


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="the TOML configuration file (default: $FARMKEYS_CONFIG, else the environment alone)",
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log in detail and show the traceback of an error",
    )
    parser = _Parser(
        prog="farmkeys",
        parents=[common],
        description="Token-signing and token-decryption certificates for a federation farm, "
        "kept identical on every node and sealed under a directory-held master key.",
    )
    parser.add_argument("--version", action="version", version=f"farmkeys {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser(
        "init",
        parents=[common],
        help="create the farm: schema, DKM container and master key, first certificates",
        description="Create everything a new farm needs: the config DB schema, the farm's DKM "
        "container and first master key in the directory, and the first token-signing and "
        "token-decryption certificates. Safe to run again: on a complete farm it changes nothing.",
    )
    db = commands.add_parser(
        "db", parents=[common], help="manage the config DB schema", description="Config DB schema."
    )
    db_commands = db.add_subparsers(dest="db_command", metavar="SUBCOMMAND", required=True)
    db_commands.add_parser(
        "upgrade",
        parents=[common],
        help="apply the sql/ migrations not yet applied",
        description="Apply the numbered migrations of sql/ that the config DB lacks, in order.",
    )
    commands.add_parser(
        "sync",
        parents=[common],
        help="install the farm's live certificates into this node's store",
        description="Install the farm's live certificates into this node's store in one atomic "
        "switch, then record what was installed in the config DB. Run it as the federation "
        "service's start-up hook. On failure the store is left as it was.",
    )
    status = commands.add_parser(
        "status",
        parents=[common],
        help="show the farm at a glance; exit 0/1/2/3 for ok/warning/critical/unknown",
        description="Show the farm's certificates, master keys and nodes. Exits 0 when all is "
        "well, 1 on a warning, 2 when critical, 3 when the config DB cannot be reached.",
    )
    status.add_argument("--json", action="store_true", help="print JSON for a machine")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process's exit code."""
    args = _parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    _configure_logging(debug)
    handlers: dict[str, Callable[[argparse.Namespace, Config], int]] = {
        "init": _init,
        "db": _db_upgrade,
        "sync": _sync,
        "status": _status,
    }
    try:
        config = config_module.load(getattr(args, "config", None))
        return handlers[args.command](args, config)
    except Error as exc:
        _report(exc, debug)
        # For monitoring, a status that failed is a status that cannot tell.
        return STATUS_UNKNOWN if args.command == "status" else EXIT_ERROR
    except KeyboardInterrupt:
        print("farmkeys: interrupted", file=sys.stderr)
        return 130


def _report(exc: Error, debug: bool) -> None:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"farmkeys: error: {exc.diagnostics()}", file=sys.stderr)


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="farmkeys: %(levelname)s: %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Libraries' own debug output may echo requests and responses: keep them quiet.
    for noisy in ("ldap3", "psycopg", "tenacity"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _init(args: argparse.Namespace, config: Config) -> int:
    with (
        ConfigDB(config.database, config.retry) as db,
        Directory(config.directory, config.retry) as directory,
    ):
        report = node.init_farm(config, db, directory, now=_now())
    for warning in report.warnings:
        print(f"farmkeys: warning: {warning}", file=sys.stderr)
    if not report.changed:
        print(
            f"farm {report.farm_name!r} is already initialised (DKM group {report.dkm_group});"
            " nothing changed"
        )
        return EXIT_OK
    for name in report.migrations:
        print(f"applied migration {name}")
    if report.created_farm:
        print(f"created farm {report.farm_name!r} with DKM group {report.dkm_group}")
    for line in report.created_certificates:
        print(f"generated {line}")
    return EXIT_OK


def _db_upgrade(args: argparse.Namespace, config: Config) -> int:
    with ConfigDB(config.database, config.retry) as db:
        applied = db.upgrade()
    if not applied:
        print("config DB schema is up to date; nothing changed")
    for name in applied:
        print(f"applied migration {name}")
    return EXIT_OK


def _sync(args: argparse.Namespace, config: Config) -> int:
    store = Store(config.store, node_id=config.node.id)
    with (
        ConfigDB(config.database, config.retry) as db,
        Directory(config.directory, config.retry) as directory,
    ):
        try:
            report = node.sync(config, db, directory, store, now=_now())
        except Error as exc:
            if not isinstance(exc, DatabaseError):
                _record_failure(db, config.node.id, exc)
            raise
    manifest = report.manifest
    verb = "installed" if report.changed else "already in sync at"
    print(f"{report.node}: {verb} generation {manifest.generation} in {store.path}")
    for entry in manifest.certificates:
        print(f"  {entry.purpose:<10} {entry.role:<9} {entry.thumbprint}")
    return EXIT_OK


def _record_failure(db: ConfigDB, node_id: str, exc: Error) -> None:
    try:
        db.record_sync_error(node_id, exc.diagnostics())
    except Error as second:
        log.warning("could not record the failed sync in the config DB: %s", second.what)


def _status(args: argparse.Namespace, config: Config) -> int:
    with (
        ConfigDB(config.database, config.retry) as db,
        Directory(config.directory, config.retry) as directory,
    ):
        doc = node.farm_status(config, db, directory, now=_now())
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(render_status(doc))
    return STATUS_EXIT[doc["health"]]


def render_status(doc: dict[str, Any]) -> str:
    """The status document as a person reads it."""
    farm = doc["farm"]
    lines = [
        f"farm      {farm['name']}   DKM group {farm['dkm_group']}",
        f"health    {doc['health'].upper()}",
    ]
    lines += [f"  - {p}" for p in doc["problems"]]
    lines += ["", "certificates"]
    for c in doc["certificates"]:
        lines.append(
            f"  {c['purpose']:<10} {c['role']:<9} {c['thumbprint']}"
            f"  valid {c['not_before'][:19]} .. {c['not_after'][:19]}  key {c['master_key']}"
        )
    lines += ["", "master keys"]
    for k in doc["master_keys"]:
        current = {True: "current", False: "", None: "(directory unavailable)"}[k["current"]]
        created = (k["created_at"] or "?")[:19]
        lines.append(f"  {k['id']}  created {created}  {current}".rstrip())
    lines += ["", "nodes"]
    if not doc["nodes"]:
        lines.append("  (none has synced yet)")
    for n in doc["nodes"]:
        state = "in sync" if n["in_sync"] else "NOT IN SYNC"
        last = (n["last_sync"] or "never")[:19]
        lines.append(f"  {n['id']:<20} {state:<12} last sync {last}  generation {n['generation']}")
    return "\n".join(lines)


def entry() -> None:
    """The console script: exit with main's code; a closed pipe (`| head`) is not an error."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit: point it elsewhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_ERROR
    sys.exit(code)


if __name__ == "__main__":
    entry()
