"""What the `farmkeys` command accepts: one small builder per command or command group.

:func:`build` composes them in the order `farmkeys --help` lists the commands;
:func:`parse_args` parses a command line with it and refuses the combinations
argparse cannot express. A usage error exits with :data:`EXIT_USAGE`.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import NoReturn

from farmkeys import __version__
from farmkeys.cli.exit_codes import EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse, exiting with EXIT_USAGE so a typo never reads as `status` critical (2);
    a mistyped command or choice gets a "did you mean"."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        help_of = self.prog.removeprefix("farmkeys").strip()
        see = f"`farmkeys {help_of} --help`" if help_of else "`farmkeys --help`"
        self.exit(EXIT_USAGE, f"farmkeys: error: {_suggest(message)} — see {see}\n")


_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)' \(choose from (.*)\)$")


def _suggest(message: str) -> str:
    """argparse's "invalid choice" message with the nearest choice offered."""
    found = _INVALID_CHOICE.search(message)
    if found is None:
        return message
    choices = [c.strip().strip("'") for c in found.group(2).split(",")]
    near = difflib.get_close_matches(found.group(1), choices, n=1, cutoff=0.6)
    return f"{message}; did you mean '{near[0]}'?" if near else message


class _Commands:
    """The subcommands of one parser, each taking the options every command takes."""

    def __init__(
        self,
        parser: argparse.ArgumentParser,
        common: argparse.ArgumentParser,
        *,
        dest: str,
        metavar: str,
        required: bool = True,
    ) -> None:
        self._subparsers = parser.add_subparsers(dest=dest, metavar=metavar, required=required)
        self._common = common

    def add(
        self, name: str, *, help: str, description: str | None = None
    ) -> argparse.ArgumentParser:
        """A command (a `_Parser`, as subparsers are made of their parent's class)."""
        return self._subparsers.add_parser(
            name, parents=[self._common], help=help, description=description
        )

    def group(
        self,
        name: str,
        *,
        dest: str,
        metavar: str,
        help: str,
        description: str,
        required: bool = True,
    ) -> tuple[argparse.ArgumentParser, _Commands]:
        """A command that takes a subcommand (`farmkeys db upgrade`); with ``required``
        False, one that also runs alone (`farmkeys nodes`). The command's own parser too."""
        parser = self.add(name, help=help, description=description)
        return parser, _Commands(
            parser, self._common, dest=dest, metavar=metavar, required=required
        )


def build() -> argparse.ArgumentParser:
    """The parser of the whole command line."""
    common = _common_options()
    parser = _Parser(
        prog="farmkeys",
        parents=[common],
        description="Token-signing and token-decryption certificates for a federation farm, "
        "kept identical on every node and sealed under a directory-held master key.",
    )
    parser.add_argument("--version", action="version", version=f"farmkeys {__version__}")
    commands = _Commands(parser, common, dest="command", metavar="COMMAND")
    for add in _BUILDERS:
        add(commands)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed command line; a usage error exits with EXIT_USAGE."""
    parser = build()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Said by the command they were given to, with its usage, not the top level's.
        _innermost(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "rollover" and args.master_key and args.purpose is not None:
        parser.error(
            "--master-key rolls the one master key of every purpose, so --purpose does not go"
            " with it; leave out one of them"
        )
    if args.command == "rollover" and args.revert:
        _check_revert(parser, args)
    return args


def _check_revert(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`rollover --revert` undoes one certificate promotion: never a master key's, never an
    urgent rollover's, one purpose at a time (signing unless --purpose says)."""
    if args.master_key:
        parser.error(
            "--revert undoes a certificate promotion and a master key is never reverted, so"
            " --master-key does not go with it; leave out one of them"
        )
    if args.urgent:
        parser.error(
            "--revert undoes the last promotion and an urgent rollover is never undone, so"
            " --urgent does not go with it; leave out one of them"
        )
    if args.purpose == "all":
        parser.error(
            "--revert undoes the promotion of one purpose; give --purpose signing or"
            " --purpose decryption"
        )


def _innermost(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The (sub)command parser that ``args`` were parsed by, following nested commands."""
    while True:
        found = [
            action
            for action in parser._actions
            if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None)
        ]
        if not found:
            return parser
        parser = found[0].choices[getattr(args, found[0].dest)]


def _common_options() -> argparse.ArgumentParser:
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
    common.add_argument(
        "--wait-for-servers",
        action="store_true",
        default=argparse.SUPPRESS,
        help="at a terminal, wait out an unreachable config DB or directory for the whole "
        "[retry] budget (default there: give up after a few seconds)",
    )
    return common


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def _add_wait(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        type=_positive_seconds,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for the leader's answer (default: 120)",
    )


def _add_reason(
    parser: argparse.ArgumentParser,
    *,
    where: str = "signed with the request and shown by `farmkeys events`",
) -> None:
    parser.add_argument(
        "--reason",
        type=_reason,
        default=None,
        metavar="TEXT",
        help=f"why you ask, in one line (at most 200 characters): {where} with your account"
        " and host",
    )


def _add_init(commands: _Commands) -> None:
    init = commands.add(
        "init",
        help="create the farm: schema, DKM container and master key, first certificates",
        description="Create everything a new farm needs: the config DB schema, the farm's DKM "
        "container and first master key in the directory, and the first token-signing and "
        "token-decryption certificates. Safe to run again: on a complete farm it changes nothing.",
    )
    _add_reason(init, where="in the init audit event, shown by `farmkeys events`,")


def _add_db(commands: _Commands) -> None:
    _, db = commands.group(
        "db",
        dest="db_command",
        metavar="SUBCOMMAND",
        help="manage the config DB schema",
        description="Config DB schema.",
    )
    db.add(
        "upgrade",
        help="apply the sql/ migrations not yet applied",
        description="Apply the numbered migrations of sql/ that the config DB lacks, in order.",
    )


def _add_sync(commands: _Commands) -> None:
    sync = commands.add(
        "sync",
        help="install the farm's live certificates into this node's store",
        description="Install the farm's live certificates into this node's store in one atomic "
        "switch, then record what was installed in the config DB. Run it as the federation "
        "service's start-up hook. On failure the store is left as it was. Exits 0 when the "
        "store holds the farm's set, 75 when the config DB or the directory cannot be reached "
        "but the installed set can still be served (it is kept), and 1 otherwise (nothing "
        "usable installed, the farm's set refused, a configuration error).",
    )
    sync.add_argument(
        "--allow-unreachable",
        action="store_true",
        help="exit 0 instead of 75 when the servers are out of reach and the installed set "
        "is kept (the federation service's ExecStartPre=)",
    )


def _add_check(commands: _Commands) -> None:
    check = commands.add(
        "check",
        help="preflight: check the config, its files, both servers, a blob, the store; 0/1/2",
        description="Check what this node's work needs, for real, writing nothing: the "
        "ownership and modes of every file farmkeys trusts and of the folders above the "
        "store, the config DB (the farm named as configured, this role's privileges, the "
        "clock offset), the directory (a bind as the service account and a read of the "
        "current master key), one live blob opened with it, the store, the hook program and "
        "the [publish] settings. One line per check: ok, warning or failed with the fix. "
        "Exits 0 when all are ok, 1 on a warning, 2 when one failed.",
    )
    check.add_argument("--json", action="store_true", help="print JSON for a machine")


def _add_status(commands: _Commands) -> None:
    status = commands.add(
        "status",
        help="show the farm at a glance; exit 0/1/2/3 for ok/warning/critical/unknown",
        description="Show the farm's certificates, master keys and nodes. Exits 0 when all is "
        "well, 1 on a warning, 2 when critical, 3 when the config DB cannot be reached.",
    )
    status.add_argument(
        "--json",
        action="store_true",
        help='print JSON for a machine (always a document: health "unknown" when it cannot tell)',
    )
    status.add_argument(
        "--wide", action="store_true", help="one line per item, however long (default: 100 columns)"
    )


def _add_serve(commands: _Commands) -> None:
    commands.add(
        "serve",
        help="run the node service: lease, rollover schedule, re-sync on change",
        description="Run this node's long-lived service: compete for the leader lease, run the "
        "rollover check on schedule while leading, re-sync the store within a second of any "
        "change, heartbeat, and run hooks.on_change after the store changed. Logs to stderr; "
        "SIGTERM or SIGINT stops it cleanly and releases the lease.",
    )


def _add_metadata(commands: _Commands) -> None:
    metadata = commands.add(
        "metadata",
        help="print the federation metadata of this node's installed keys (signed)",
        description="Print the federation metadata built from this node's store, as AD FS "
        "publishes it: a WS-Federation SecurityTokenServiceType role and a SAML 2.0 IdP role, "
        "with the primary, the secondary and every unexpired retired token-signing certificate "
        "as signing keys and the primary token-decryption certificate as the encryption key, "
        "signed with the signing primary unless [publish] sign_metadata is false. The same "
        "document `serve` answers at /FederationMetadata/2007-06/FederationMetadata.xml.",
    )
    metadata.add_argument("--entity-id", metavar="URI", help="the entityID (default: [publish])")
    metadata.add_argument(
        "--sso-url", metavar="URL", help="the SingleSignOnService location (default: [publish])"
    )


def _add_jwks(commands: _Commands) -> None:
    commands.add(
        "jwks",
        help="print the JSON Web Key Set of this node's installed signing keys",
        description="Print the JSON Web Key Set of the signing certificates this node's store "
        "publishes (kid and x5t: the base64url SHA-1 thumbprint, as AD FS's "
        "/adfs/discovery/keys). The same document `serve` answers there.",
    )


def _add_rollover(commands: _Commands) -> None:
    rollover = commands.add(
        "rollover",
        help="add a secondary now, with --urgent replace the primary at once, or with --revert"
        " undo the last promotion",
        description="Ask the leader to roll certificates over now and print its answer. Without "
        "--urgent, add a secondary (AD FS's Update-AdfsCertificate), or release the promotion a "
        "revert held; with it, generate a new primary at once and archive the replaced "
        "certificates (-Urgent). With --revert, make the certificate the last promotion retired "
        "primary again and the current primary secondary, and hold its promotion until a plain "
        "`rollover` or the critical threshold (not after an urgent rollover). With --master-key, "
        "roll the farm's master key instead: a new key, every live blob re-sealed under it, "
        "and with --urgent the replaced key deleted at once. When no node leads, this command "
        "takes the lease for the operation itself.",
    )
    rollover.add_argument(
        "--purpose",
        choices=("signing", "decryption", "all"),
        default=None,
        help="which certificates (default: all; with --revert: signing)",
    )
    rollover.add_argument(
        "--revert",
        action="store_true",
        help="undo the last promotion of --purpose: its retired certificate becomes primary"
        " again, the primary secondary, and promotion waits for a plain `rollover`",
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
        "--yes",
        action="store_true",
        help="with --urgent or --revert: do not ask for confirmation (for scripts; without a"
        " terminal it is required)",
    )
    _add_wait(rollover)
    _add_reason(rollover)


def _add_repair_state(commands: _Commands) -> None:
    repair = commands.add(
        "repair-state",
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
    _add_wait(repair)
    _add_reason(repair)


def _add_escrow(commands: _Commands) -> None:
    _, escrow = commands.group(
        "escrow",
        dest="escrow_command",
        metavar="ACTION",
        help="export the master keys sealed under a passphrase, or import them back",
        description="The way back from a lost DKM container: `export` writes every master key "
        "the directory holds into an age file sealed under a passphrase (it opens with "
        "`age -d` too); `import` puts the keys back into the directory, re-creating the "
        "container if it is gone. The passphrase comes from --passphrase-file (mode 0600) "
        "or the terminal, never from the command line.",
    )
    export = escrow.add("export", help="write the master keys to a new escrow file")
    export.add_argument("--out", required=True, metavar="FILE", help="the file to create")
    import_ = escrow.add("import", help="put the master keys of an escrow file back")
    import_.add_argument("file", metavar="FILE", help="an escrow file of this farm")
    for sub in (export, import_):
        _add_reason(sub, where="in its audit event, shown by `farmkeys events`,")
        sub.add_argument(
            "--passphrase-file",
            metavar="PATH",
            help="read the passphrase from the first line of PATH (no group or other access);"
            " default: ask on the terminal",
        )


def _add_import(commands: _Commands) -> None:
    _, sources = commands.group(
        "import",
        dest="import_source",
        metavar="SOURCE",
        help="bring an AD FS farm's certificate into this farm, keeping its key and thumbprint",
        description="Bring certificates from elsewhere into the farm without re-configuring "
        "relying parties: the certificate keeps its key and thumbprint.",
    )
    adfs = sources.add(
        "adfs",
        help="an AD FS token-signing or token-decrypting certificate (its EncryptedPfx)",
        description="Read the EncryptedPfx of an AD FS certificate (base64, as in the service "
        "settings of AD FS's configuration database), open it with its DKM key (found in the "
        "directory under directory.container, or given with --dkm-key-file), check it, and "
        "have the leader add it to the farm, fenced and audited. Default role: secondary, so "
        "relying parties see it before it signs.",
    )
    adfs.add_argument(
        "--encrypted-pfx", required=True, metavar="FILE", help="the EncryptedPfx (base64 or raw)"
    )
    adfs.add_argument("--purpose", required=True, choices=("signing", "decryption"))
    adfs.add_argument(
        "--role",
        choices=("primary", "secondary"),
        default="secondary",
        help="secondary (default), or primary: replace the primary at once and retire it",
    )
    adfs.add_argument(
        "--dkm-key-file",
        metavar="FILE",
        help="the AD FS DKM key as hex or base64 (mode 0600); default: read it from the directory",
    )
    _add_wait(adfs)
    _add_reason(adfs)


def _add_nodes(commands: _Commands) -> None:
    nodes, actions = commands.group(
        "nodes",
        dest="nodes_command",
        metavar="ACTION",
        required=False,
        help="list the farm's nodes; `nodes remove NODE` forgets one that is gone",
        description="Without an action: every node the config DB knows, with when it was last "
        "seen, whether its serve runs (serving, stopped since <time>, sync only), whether it "
        "has installed the live set, and the farmkeys it runs. `remove` deletes a node's row, "
        "audited (node_remove).",
    )
    nodes.add_argument("--json", action="store_true", help="print JSON for a machine")
    remove = actions.add(
        "remove",
        help="forget a node that is gone for good (its row; audited)",
        description="Delete NODE's row from the config DB, audited as node_remove with your "
        "account, host and --reason. Refused for a node heard from within the lease's ttl "
        "(it still runs: stop it first) unless --force. A node that runs again simply "
        "re-appears.",
    )
    remove.add_argument("node", metavar="NODE", help="the node's id (`farmkeys nodes` lists them)")
    remove.add_argument(
        "--force", action="store_true", help="remove it even though it was heard from lately"
    )
    _add_reason(remove, where="in its audit event, shown by `farmkeys events`,")


def _add_events(commands: _Commands) -> None:
    events = commands.add(
        "events",
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


# In the order `farmkeys --help` lists them.
_BUILDERS: tuple[Callable[[_Commands], None], ...] = (
    _add_init,
    _add_db,
    _add_sync,
    _add_check,
    _add_status,
    _add_serve,
    _add_metadata,
    _add_jwks,
    _add_rollover,
    _add_repair_state,
    _add_escrow,
    _add_import,
    _add_nodes,
    _add_events,
)

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _reason(text: str) -> str:
    """A request's ``--reason``: one line of printable text within the request's limit."""
    from farmkeys.formats import request as request_format  # only when --reason is given

    why = request_format.text_problem(text, limit=request_format.MAX_REASON)
    if why is not None:
        raise argparse.ArgumentTypeError(
            f"the reason is refused: {why}; give one line of at most"
            f" {request_format.MAX_REASON} printable characters"
        )
    return text


def _since(text: str) -> datetime:
    """An ISO 8601 time (UTC when it names no zone), or an age before now."""
    value = text.strip()
    if value[-1:] in _AGE_UNITS and value[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(value[:-1]) * _AGE_UNITS[value[-1]])
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO 8601 time nor an age like 30m, 12h or 7d"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
