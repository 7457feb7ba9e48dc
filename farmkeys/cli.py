"""The `farmkeys` command: a thin shell over the modules that do the work.

Expected failures (every :class:`farmkeys.errors.Error`) print one line,
``farmkeys: error: <what is wrong> — <what to do>``, to stderr and exit 1;
``--debug`` adds the traceback. `status` exits 0 / 1 / 2 for ok / warning /
critical, and 3 when it cannot tell because the config DB is out of reach.

The config DB is attacker-writable: every text this module prints that may hold a DB
string (status, events, a leader's answer, an error, a log line) passes through
:func:`farmkeys.terminal.escape` on its way out, one line at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from farmkeys import __version__
from farmkeys import config as config_module
from farmkeys.config import Config
from farmkeys.errors import DatabaseError, Error, ImportRefusedError, RequestRefusedError
from farmkeys.terminal import EscapingFormatter, escape

# Each command imports what it needs when it runs: a `farmkeys sync` that finds nothing to
# do never loads ldap3, certificate building, the leader's code or APScheduler.
if TYPE_CHECKING:
    from farmkeys.db import ConfigDB
    from farmkeys.rollover import RolloverOutcome
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
    commands.add_parser(
        "serve",
        parents=[common],
        help="run the node service: lease, rollover schedule, re-sync on change",
        description="Run this node's long-lived service: compete for the leader lease, run the "
        "rollover check on schedule while leading, re-sync the store within a second of any "
        "change, heartbeat, and run hooks.on_change after the store changed. Logs to stderr; "
        "SIGTERM or SIGINT stops it cleanly and releases the lease.",
    )
    metadata = commands.add_parser(
        "metadata",
        parents=[common],
        help="print the SAML 2.0 IdP metadata of this node's installed keys",
        description="Print SAML 2.0 IdP metadata built from this node's store: the primary, "
        "the secondary and every unexpired retired token-signing certificate as signing "
        "keys, the primary token-decryption certificate as the encryption key. The same "
        "document `serve` answers at /FederationMetadata/2007-06/FederationMetadata.xml.",
    )
    metadata.add_argument("--entity-id", metavar="URI", help="the entityID (default: [publish])")
    metadata.add_argument(
        "--sso-url", metavar="URL", help="the SingleSignOnService location (default: [publish])"
    )
    commands.add_parser(
        "jwks",
        parents=[common],
        help="print the JSON Web Key Set of this node's installed signing keys",
        description="Print the JSON Web Key Set of the signing certificates this node's store "
        "publishes (kid and x5t: the base64url SHA-1 thumbprint, as AD FS's "
        "/adfs/discovery/keys). The same document `serve` answers there.",
    )
    rollover = commands.add_parser(
        "rollover",
        parents=[common],
        help="add a secondary now, or with --urgent replace the primary at once",
        description="Ask the leader to roll certificates over now and print its answer. Without "
        "--urgent, add a secondary (AD FS's Update-AdfsCertificate); with it, generate a new "
        "primary at once and archive the replaced certificates (-Urgent). With --master-key, "
        "roll the farm's master key instead: a new key, every live blob re-sealed under it, "
        "and with --urgent the replaced key deleted at once. When no node leads, this command "
        "takes the lease for the operation itself.",
    )
    rollover.add_argument(
        "--purpose",
        choices=("signing", "decryption", "all"),
        default=None,
        help="which certificates (default: all)",
    )
    rollover.add_argument(
        "--master-key",
        action="store_true",
        help="roll the master key instead: a new key, every live blob re-sealed under it",
    )
    rollover.add_argument(
        "--urgent",
        action="store_true",
        help="replace the primary at once; with --master-key, delete the replaced key at once",
    )
    rollover.add_argument(
        "--wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for the leader's answer (default: 120)",
    )
    repair = commands.add_parser(
        "repair-state",
        parents=[common],
        help="authenticate the config DB's live certificates as the farm state, after a restore",
        description="When the farm state record fails authentication or no longer matches "
        "the certificates (after restoring the config DB from a backup, say), and you have "
        "checked that the live certificates `farmkeys status` shows are the ones the farm "
        "should have: ask the leader (or take the lease when no node leads) to write a new "
        "farm state record for them, under the current master key. It first shows every "
        "difference it would authenticate and asks you to confirm; the request is signed "
        "over exactly those rows, so the leader writes nothing if they changed meanwhile. "
        "Nothing revoked is ever dropped: a certificate that an urgent rollover replaced is "
        "archived again, never authenticated; when no record verifies, name the revoked "
        "thumbprints with --revoked. Audited as state_repair.",
    )
    repair.add_argument(
        "--revoked",
        metavar="FILE",
        default=None,
        help="thumbprints (one per line) the new record keeps as urgently replaced; required"
        " when no farm state record verifies (an empty file if there are none)",
    )
    repair.add_argument(
        "--yes",
        action="store_true",
        help="do not ask for confirmation (for scripts; without a terminal it is required)",
    )
    repair.add_argument(
        "--wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for the leader's answer (default: 120)",
    )
    escrow_parser = commands.add_parser(
        "escrow",
        parents=[common],
        help="export the master keys sealed under a passphrase, or import them back",
        description="The way back from a lost DKM container: `export` writes every master key "
        "the directory holds into an age file sealed under a passphrase (it opens with "
        "`age -d` too); `import` puts the keys back into the directory, re-creating the "
        "container if it is gone. The passphrase comes from --passphrase-file (mode 0600) "
        "or the terminal, never from the command line.",
    )
    escrow_commands = escrow_parser.add_subparsers(
        dest="escrow_command", required=True, metavar="ACTION"
    )
    escrow_export = escrow_commands.add_parser(
        "export", parents=[common], help="write the master keys to a new escrow file"
    )
    escrow_export.add_argument("--out", required=True, metavar="FILE", help="the file to create")
    escrow_import = escrow_commands.add_parser(
        "import", parents=[common], help="put the master keys of an escrow file back"
    )
    escrow_import.add_argument("file", metavar="FILE", help="an escrow file of this farm")
    for sub in (escrow_export, escrow_import):
        sub.add_argument(
            "--passphrase-file",
            metavar="PATH",
            help="read the passphrase from the first line of PATH (no group or other access);"
            " default: ask on the terminal",
        )
    import_parser = commands.add_parser(
        "import",
        parents=[common],
        help="bring an AD FS farm's certificate into this farm, keeping its key and thumbprint",
        description="Bring certificates from elsewhere into the farm without re-configuring "
        "relying parties: the certificate keeps its key and thumbprint.",
    )
    import_commands = import_parser.add_subparsers(
        dest="import_source", required=True, metavar="SOURCE"
    )
    import_adfs = import_commands.add_parser(
        "adfs",
        parents=[common],
        help="an AD FS token-signing or token-decrypting certificate (its EncryptedPfx)",
        description="Read the EncryptedPfx of an AD FS certificate (base64, as in the service "
        "settings of AD FS's configuration database), open it with its DKM key (found in the "
        "directory under directory.container, or given with --dkm-key-file), check it, and "
        "have the leader add it to the farm, fenced and audited. Default role: secondary, so "
        "relying parties see it before it signs.",
    )
    import_adfs.add_argument(
        "--encrypted-pfx", required=True, metavar="FILE", help="the EncryptedPfx (base64 or raw)"
    )
    import_adfs.add_argument("--purpose", required=True, choices=("signing", "decryption"))
    import_adfs.add_argument(
        "--role",
        choices=("primary", "secondary"),
        default="secondary",
        help="secondary (default), or primary: replace the primary at once and retire it",
    )
    import_adfs.add_argument(
        "--dkm-key-file",
        metavar="FILE",
        help="the AD FS DKM key as hex or base64 (mode 0600); default: read it from the directory",
    )
    import_adfs.add_argument(
        "--wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for the leader's answer (default: 120)",
    )
    events = commands.add_parser(
        "events",
        parents=[common],
        help="show the audit log",
        description="Show what changed the farm: when, what, which node, under which term.",
    )
    events.add_argument(
        "--since",
        metavar="TIME",
        type=_since,
        help="only events from TIME on: ISO 8601 (2026-11-01T00:00Z) or an age: 30m, 12h, 7d",
    )
    events.add_argument("--json", action="store_true", help="print JSON for a machine")
    return parser


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _since(text: str) -> datetime:
    """An ISO 8601 time (UTC when it names no zone), or an age before now."""
    value = text.strip()
    if value[-1:] in _AGE_UNITS and value[:-1].isdigit():
        return _now() - timedelta(seconds=int(value[:-1]) * _AGE_UNITS[value[-1]])
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO 8601 time nor an age like 30m, 12h or 7d"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process's exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "rollover" and args.master_key and args.purpose is not None:
        parser.error(
            "--master-key rolls the one master key of every purpose, so --purpose does not go"
            " with it; leave out one of them"
        )
    debug = bool(getattr(args, "debug", False))
    _configure_logging(debug, service=args.command == "serve")
    handlers: dict[str, Callable[[argparse.Namespace, Config], int]] = {
        "init": _init,
        "db": _db_upgrade,
        "sync": _sync,
        "status": _status,
        "serve": _serve,
        "rollover": _rollover,
        "repair-state": _repair_state,
        "escrow": _escrow,
        "import": _import,
        "events": _events,
        "metadata": _metadata,
        "jwks": _jwks,
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
    # An error's text may quote the config DB (a lease holder, a leader's answer).
    if debug:
        for chunk in traceback.format_exception(exc):
            sys.stderr.write("\n".join(escape(line) for line in chunk.split("\n")))
    print(f"farmkeys: error: {escape(exc.diagnostics())}", file=sys.stderr)


def _configure_logging(debug: bool, *, service: bool = False) -> None:
    # A service tells what it does; a command speaks only when something is wrong.
    level = logging.DEBUG if debug else logging.INFO if service else logging.WARNING
    fmt = (
        "%(asctime)s farmkeys %(levelname)s %(name)s: %(message)s"
        if service
        else "farmkeys: %(levelname)s: %(name)s: %(message)s"
    )
    # Every message escaped, from whichever module: it may quote the config DB.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
    # Libraries' own debug output may echo requests and responses: keep them quiet.
    for noisy in ("ldap3", "psycopg", "tenacity", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _init(args: argparse.Namespace, config: Config) -> int:
    from farmkeys import init
    from farmkeys.db import ConfigDB
    from farmkeys.directory import Directory

    with (
        ConfigDB(config.database, config.retry) as db,
        Directory(config.directory, config.retry) as directory,
    ):
        report = init.init_farm(config, db, directory, now=_now())
    for warning in report.warnings:
        print(f"farmkeys: warning: {escape(warning)}", file=sys.stderr)
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
    from farmkeys.db import ConfigDB

    with ConfigDB(config.database, config.retry) as db:
        applied = db.upgrade()
    if not applied:
        print("config DB schema is up to date; nothing changed")
    for name in applied:
        print(f"applied migration {name}")
    return EXIT_OK


def _sync(args: argparse.Namespace, config: Config) -> int:
    from farmkeys import sync
    from farmkeys.db import ConfigDB
    from farmkeys.directory import Deferred

    store = _store(config)
    # The directory is made (and ldap3 loaded) only if the sync needs a master key.
    directory = Deferred(config.directory, config.retry)
    try:
        with ConfigDB(config.database, config.retry) as db:
            try:
                report = sync.sync(config, db, directory, store, now=_now())
            except Error as exc:
                if not isinstance(exc, DatabaseError):
                    _record_failure(db, config.node.id, exc)
                raise
    finally:
        directory.close()
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
    from farmkeys import status
    from farmkeys.db import ConfigDB
    from farmkeys.directory import Directory

    with (
        ConfigDB(config.database, config.retry) as db,
        Directory(config.directory, config.retry) as directory,
    ):
        doc = status.farm_status(config, db, directory, now=_now())
    if args.json:
        # Indented for a person at a terminal; compact for a program (json's C encoder only
        # runs without indent: a farm of 1,000 nodes prints in a few ms instead of ~70).
        print(json.dumps(doc, indent=2 if sys.stdout.isatty() else None))
    else:
        print(render_status(doc))
    return STATUS_EXIT[doc["health"]]


def _serve(args: argparse.Namespace, config: Config) -> int:
    from farmkeys.serve import Service

    return Service(config).run()


def _metadata(args: argparse.Namespace, config: Config) -> int:
    from farmkeys import publish

    entity_id, sso_url = publish.metadata_settings(
        config.publish, entity_id=args.entity_id, sso_url=args.sso_url
    )
    keys = publish.from_store(_store(config), now=_now())
    sys.stdout.write(publish.metadata(keys, entity_id=entity_id, sso_url=sso_url).decode())
    return EXIT_OK


def _jwks(args: argparse.Namespace, config: Config) -> int:
    from farmkeys import publish

    sys.stdout.write(publish.jwks(publish.from_store(_store(config), now=_now())).decode())
    return EXIT_OK


def _store(config: Config) -> Store:
    from farmkeys.store import Store

    return Store(config.store, node_id=config.node.id, group=config.node.store_group)


def _rollover(args: argparse.Namespace, config: Config) -> int:
    purpose = None if args.master_key else (args.purpose or "all")
    return _request(args, config, "rollover", purpose=purpose, urgent=args.urgent)


def _repair_state(args: argparse.Namespace, config: Config) -> int:
    from farmkeys import repair, rollover
    from farmkeys.db import ConfigDB
    from farmkeys.directory import Directory

    named = None if args.revoked is None else repair.read_revoked_file(Path(args.revoked))
    with (
        ConfigDB(config.database, config.retry) as db,
        Directory(config.directory, config.retry) as directory,
    ):
        review = repair.review(db, directory, revoked_file=named)
        for line in review.lines:
            print(f"  {escape(line)}")
        if not review.needed:
            print(
                "repair-state: the farm state record is authentic and matches the live rows;"
                " nothing to repair"
            )
            return EXIT_OK
        if not review.terms.revoked_named and any(
            line.startswith("no farm state record verifies") for line in review.lines
        ):
            raise RequestRefusedError(
                "no farm state record verifies, so the revoked thumbprints it kept are unknown",
                "name the urgently replaced thumbprints to keep with --revoked FILE (an empty"
                " file if there are none); nothing was changed",
            )
        print(
            f"repair-state would authenticate these live rows as farm state version"
            f" {review.terms.min_version} or above, keeping {len(review.terms.revoked)}"
            " thumbprints revoked."
        )
        if not args.yes:
            if not sys.stdin.isatty():
                raise RequestRefusedError(
                    "repair-state needs confirmation and there is no terminal to ask at",
                    "review the lines above and run it again with --yes; nothing was changed",
                )
            if input("Authenticate them? [y/N] ").strip().lower() not in ("y", "yes"):
                print("repair-state: nothing was changed")
                return EXIT_ERROR
        outcome = rollover.request_rollover(
            config,
            db,
            directory,
            purpose="all",
            urgent=False,
            repair=review.terms,
            timeout_seconds=args.wait,
        )
    return _answer("repair-state", outcome)


def _request(
    args: argparse.Namespace,
    config: Config,
    kind: str,
    *,
    purpose: str | None,
    urgent: bool = False,
) -> int:
    """Ask the leader (or, when no node leads, act under the lease) and print its answer."""
    from farmkeys import rollover
    from farmkeys.db import ConfigDB
    from farmkeys.directory import Directory

    with (
        ConfigDB(config.database, config.retry) as db,
        Directory(config.directory, config.retry) as directory,
    ):
        outcome = rollover.request_rollover(
            config,
            db,
            directory,
            purpose=purpose,
            urgent=urgent,
            timeout_seconds=args.wait,
        )
    return _answer(kind, outcome)


# An EncryptedPfx is a few kilobytes; adfs.parse refuses blobs over 1 MiB (1.4 MB of base64).
_MAX_PFX_FILE = 4 * 1024 * 1024


def _import(args: argparse.Namespace, config: Config) -> int:
    from farmkeys import adfs_import
    from farmkeys.db import ConfigDB
    from farmkeys.directory import Directory

    path = Path(args.encrypted_pfx)
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_PFX_FILE + 1)
    except OSError as exc:
        raise ImportRefusedError(
            f"cannot read the EncryptedPfx file {path}: {exc.strerror}",
            "give the path of a file holding the certificate's EncryptedPfx",
        ) from None
    if len(data) > _MAX_PFX_FILE:
        raise ImportRefusedError(
            f"the EncryptedPfx file {path} is larger than {_MAX_PFX_FILE} bytes",
            "give the file holding one certificate's EncryptedPfx, nothing more",
        )
    with (
        ConfigDB(config.database, config.retry) as db,
        Directory(config.directory, config.retry) as directory,
    ):
        outcome = adfs_import.import_adfs(
            config,
            db,
            directory,
            encrypted_pfx=data,
            purpose=args.purpose,
            role=args.role,
            key_file=Path(args.dkm_key_file) if args.dkm_key_file else None,
            now=_now(),
            timeout_seconds=args.wait,
        )
    if not outcome.ok:
        raise ImportRefusedError(
            f"{outcome.done_by or 'the leader'} answered import request {outcome.request}:"
            f" {' '.join(outcome.result.split())}",
            "nothing was changed; correct the input, or check `farmkeys status`, and try again",
        )
    return _answer("import", outcome)


def _answer(kind: str, outcome: RolloverOutcome) -> int:
    """Print the leader's answer to a request; the exit code it means.

    The answer is read from the config DB: its lines are the leader's (split at newlines
    only), every control character within them escaped.
    """
    by = escape(str(outcome.done_by))
    print(f"{kind} request {outcome.request}, answered by {by} (term {outcome.term}):")
    for line in outcome.result.removesuffix("\n").split("\n") if outcome.result else ():
        print(f"  {escape(line)}")
    return EXIT_OK if outcome.ok else EXIT_ERROR


def _escrow(args: argparse.Namespace, config: Config) -> int:
    from farmkeys import escrow
    from farmkeys.db import ConfigDB
    from farmkeys.directory import Directory

    exporting = args.escrow_command == "export"
    passphrase = escrow.read_passphrase(
        args.passphrase_file,
        confirm=exporting,
        minimum=escrow.MIN_PASSPHRASE if exporting else 0,
    )
    with (
        ConfigDB(config.database, config.retry) as db,
        Directory(config.directory, config.retry) as directory,
    ):
        if exporting:
            exported = escrow.export_keys(
                config, db, directory, out=Path(args.out), passphrase=passphrase, now=_now()
            )
            print(
                f"wrote {len(exported.keys)} master keys of farm {exported.farm!r}"
                f" (DKM group {exported.dkm_group}) to {exported.path}, sealed under the"
                " passphrase; keep the file and the passphrase apart"
            )
            for key_id in exported.keys:
                print(f"  {key_id}{'  current' if key_id == exported.current else ''}")
            return EXIT_OK
        report = escrow.import_keys(
            config, db, directory, path=Path(args.file), passphrase=passphrase
        )
    if report.recreated_container:
        print(
            f"re-created the DKM container of farm {report.farm!r} (DKM group {report.dkm_group})"
        )
    for key_id in report.restored:
        print(f"restored master key {key_id}")
    for key_id in report.present:
        print(f"master key {key_id} was already in the directory")
    for key_id in report.skipped_deleted:
        print(f"master key {key_id} not restored: the farm deleted it, and it stays deleted")
    return EXIT_OK


def _events(args: argparse.Namespace, config: Config) -> int:
    from farmkeys.db import ConfigDB

    with ConfigDB(config.database, config.retry) as db:
        db.require_farm()
        rows = db.events(since=args.since)
    docs = [
        {
            "id": r["id"],
            "at": r["at"].isoformat(),
            "node": r["node"],
            "term": r["term"],
            "action": r["action"],
            "purpose": r["purpose"],
            "certificate": None if r["certificate"] is None else str(r["certificate"]),
            "thumbprint": r["thumbprint"],
            "master_key": None if r["master_key"] is None else str(r["master_key"]),
            "detail": r["detail"],
        }
        for r in rows
    ]
    if args.json:
        print(json.dumps(docs, indent=2))
        return EXIT_OK
    for d in docs:
        term = "-" if d["term"] is None else d["term"]
        subject = (d["action"], d["purpose"], d["thumbprint"], d["master_key"])
        what = " ".join(x for x in subject if x)
        line = f"{d['at'][:19]}  {d['node']:<12} term {term!s:<4} {what}  {d['detail']}"
        print(escape(line).rstrip())
    if not docs:
        print("no events")
    return EXIT_OK


def render_status(doc: dict[str, Any]) -> str:
    """The status document as a person reads it, each line escaped (it quotes the config DB)."""
    farm = doc["farm"]
    lines = [
        f"farm      {farm['name']}   DKM group {farm['dkm_group']}",
        f"health    {doc['health'].upper()}",
    ]
    lines += [f"  - {p}" for p in doc["problems"]]
    leader = doc.get("leader")
    lines.append(
        f"leader    {leader['node']} (term {leader['term']},"
        f" lease until {leader['expires_at'][:19]})"
        if leader
        else "leader    none"
    )
    lines += ["", "certificates"]
    for c in doc["certificates"]:
        nxt = c.get("next_action")
        then = f"  next: {nxt['action']} at {nxt['at'][:19]}" if nxt else ""
        lines.append(
            f"  {c['purpose']:<10} {c['role']:<9} {c['thumbprint']}"
            f"  valid {c['not_before'][:19]} .. {c['not_after'][:19]}  key {c['master_key']}{then}"
        )
    lines += ["", "master keys"]
    for k in doc["master_keys"]:
        created = (k["created_at"] or "?")[:19]
        when = ""
        if k.get("roll_at"):
            when = f"  rolls at {k['roll_at'][:19]}"
        elif k.get("delete_at"):
            when = f"  delete at {k['delete_at'][:19]}"
        gone = k.get("in_directory") is False and k["state"] != "deleted"
        missing = "  MISSING FROM THE DIRECTORY" if gone else ""
        lines.append(
            f"  {k['id']}  {k['state']:<8}  created {created}  sealed: {k['sealed_live']} live,"
            f" {k['sealed_archived']} archived{when}{missing}"
        )
    state = doc.get("farm_state") or {}
    trust = {True: "authentic", False: "NOT AUTHENTIC", None: "not checked"}[state.get("authentic")]
    lines += ["", f"farm state  version {state.get('version')}  {trust}"]
    lines += ["", "nodes"]
    if not doc["nodes"]:
        lines.append("  (none has synced yet)")
    for n in doc["nodes"]:
        state = "in sync" if n["in_sync"] else "NOT IN SYNC"
        last = (n["last_sync"] or "never")[:19]
        contact = (n.get("heartbeat_at") or n["last_seen"] or "never")[:19]
        dc = f"  directory {n['directory_server']}" if n.get("directory_server") else ""
        lines.append(
            f"  {n['id']:<20} {state:<12} last sync {last}  generation {n['generation']}"
            f"  last contact {contact}{dc}"
        )
    parties = doc.get("relying_parties") or []
    if parties:
        lines += ["", "relying parties"]
    for rp in parties:
        seen = {True: "has the secondary", False: "HAS NOT FETCHED THE SECONDARY", None: ""}
        last = (rp["last_fetch_at"] or "never")[:19]
        lines.append(f"  {rp['name']:<20} last fetch {last}  {seen[rp['has_secondary']]}".rstrip())
    return "\n".join(escape(line) for line in lines)


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
