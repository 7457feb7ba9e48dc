"""The commands of `farmkeys`: each reads its arguments and the config, calls the module
that does the work, and prints what it did; :data:`HANDLERS` names them.

Each command imports what it needs when it runs: a `farmkeys sync` that finds nothing to
do never loads ldap3, certificate building, the leader's code or APScheduler.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from farmkeys.cli.exit_codes import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_UNREACHABLE,
    STATUS_EXIT,
)
from farmkeys.cli.local import node_store
from farmkeys.cli.nodes import nodes_command
from farmkeys.cli.preflight import check_command
from farmkeys.cli.render import (
    answer_lines,
    events_json,
    events_text,
    status_json,
    status_text,
)
from farmkeys.config import Config
from farmkeys.errors import (
    DatabaseError,
    Error,
    ImportRefusedError,
    RequestRefusedError,
    UnreachableError,
)
from farmkeys.operator import requester
from farmkeys.terminal import escape

if TYPE_CHECKING:
    from farmkeys.db import ConfigDB
    from farmkeys.directory import Directory
    from farmkeys.requesting import RolloverOutcome
    from farmkeys.store import Store

log = logging.getLogger("farmkeys")


def _now() -> datetime:
    return datetime.now(UTC)


def _init(args: argparse.Namespace, config: Config) -> int:
    from farmkeys import farm_init
    from farmkeys.db import ConfigDB
    from farmkeys.directory import Directory

    with (
        ConfigDB(config.database, config.retry) as db,
        Directory(config.directory, config.retry) as directory,
    ):
        report = farm_init.init_farm(config, db, directory, now=_now(), by=requester(args.reason))
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

    store = node_store(config)
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
    except UnreachableError as exc:
        return _kept_installed(exc, store, allow=args.allow_unreachable)
    finally:
        directory.close()
    manifest = report.manifest
    verb = "installed" if report.changed else "already in sync at"
    print(f"{report.node}: {verb} generation {manifest.generation} in {store.path}")
    for entry in manifest.certificates:
        print(f"  {entry.purpose:<10} {entry.role:<9} {entry.thumbprint}")
    return EXIT_OK


def _kept_installed(exc: UnreachableError, store: Store, *, allow: bool) -> int:
    """A server is out of reach: EXIT_UNREACHABLE (0 with ``allow``) when the installed set
    can still be served, which the store alone decides; else the error, saying why."""
    from farmkeys.store.usable import installed_problems

    try:
        installed, store_error = store.verify_installed(), None
    except Error as error:
        installed, store_error = None, error
    problems = installed_problems(installed, store_error, now=_now())
    if problems or installed is None:
        raise type(exc)(
            f"{exc.what}; and this node cannot serve without it: {problems[0]}", exc.todo
        )
    print(
        f"farmkeys: warning: {escape(exc.what)}; kept the installed generation "
        f"{installed.manifest.generation} in {store.path} — {escape(exc.todo)}",
        file=sys.stderr,
    )
    return EXIT_OK if allow else EXIT_UNREACHABLE


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
        farm = status.read_farm_status(config, db, directory, now=_now())
    if args.json:
        print(status_json(farm, pretty=sys.stdout.isatty()))
    else:
        print(status_text(farm, wide=args.wide))
    return STATUS_EXIT[farm.health]


def _serve(args: argparse.Namespace, config: Config) -> int:
    from farmkeys.serve import Service

    return Service(config).run()


def _metadata(args: argparse.Namespace, config: Config) -> int:
    from farmkeys import publish

    document = publish.metadata_of_store(
        config.publish,
        node_store(config),
        now=_now(),
        entity_id=args.entity_id,
        sso_url=args.sso_url,
    )
    sys.stdout.write(document.decode())
    return EXIT_OK


def _jwks(args: argparse.Namespace, config: Config) -> int:
    from farmkeys import publish

    sys.stdout.write(publish.jwks(publish.from_store(node_store(config), now=_now())).decode())
    return EXIT_OK


def _rollover(args: argparse.Namespace, config: Config) -> int:
    if args.revert:
        return _revert(args, config, args.purpose or "signing")
    purpose = None if args.master_key else (args.purpose or "all")
    review = None
    if args.urgent:
        review = _master_key_shred if args.master_key else _certificates_archived(purpose)
    return _request(args, config, "rollover", purpose=purpose, urgent=args.urgent, review=review)


Review = Callable[["ConfigDB", "Directory"], tuple[list[str], str]]


def _certificates_archived(purpose: str | None) -> Review:
    """What `rollover --urgent` will do, as the config DB lists it, and the question."""

    def review(db: ConfigDB, directory: Directory) -> tuple[list[str], str]:
        purposes = ("signing", "decryption") if purpose in (None, "all") else (purpose,)
        lines = []
        for row in db.certificates(include_archived=False):
            if row.purpose in purposes and row.role in ("primary", "secondary"):
                lines.append(
                    f"archive the {row.purpose} {row.role} {row.thumbprint}"
                    f" (valid until {row.not_after:%Y-%m-%dT%H:%M:%SZ})"
                )
        lines += [f"make a new {p} primary and sign with it at once" for p in purposes]
        lines.append("relying parties reject the tokens it signs until they fetch the new metadata")
        return lines, "Replace them now?"

    return review


def _master_key_shred(db: ConfigDB, directory: Directory) -> tuple[list[str], str]:
    """What `rollover --master-key --urgent` will destroy, as the config DB lists it."""
    keys = db.master_keys()
    current = next((k for k in keys if k.stage == "current"), None)
    if current is None:
        return ["make a new master key; the config DB names no current one"], "Roll it now?"
    sealed = [
        r
        for r in db.certificates()
        if r.master_key == current.id and r.role in ("archived", "retired")
    ]
    lines = [
        "make a new master key and re-seal every live certificate under it",
        f"delete master key {current.id} from the directory at once",
    ]
    lines += [
        f"the {r.purpose} {r.role} {r.thumbprint} sealed under it can never be opened again"
        for r in sealed
    ]
    return lines, "Shred it now?"


def _revert(args: argparse.Namespace, config: Config, purpose: str) -> int:
    """`rollover --revert`: show what the revert will do, as the authenticated farm state
    record and the policy say (refused in one line, nothing asked, when they do not allow
    it), confirm, ask the leader, and print its answer, or its refusal as one line."""
    outcome = _filed(
        args,
        config,
        what="rollover --revert",
        purpose=purpose,
        revert=True,
        review=_reverted(config, purpose),
    )
    if outcome is None:
        return EXIT_ERROR
    if not outcome.ok:
        answer = outcome.result.strip().replace("\n", "; ")
        what, _, todo = answer.partition(" — ")
        raise RequestRefusedError(
            f"rollover request {outcome.request} was refused by {outcome.done_by} (term"
            f" {outcome.term}): {what}",
            todo or "nothing was changed",
        )
    return _answer("rollover", outcome)


def _reverted(config: Config, purpose: str) -> Review:
    """What `rollover --revert` of ``purpose`` will do, and the question."""

    def review(db: ConfigDB, directory: Directory) -> tuple[list[str], str]:
        from farmkeys import requesting

        plan = requesting.preview_revert(config, db, directory, purpose)
        critical_at = plan.primary.not_after - config.policy.units(config.policy.critical_threshold)
        lines = [
            f"make the {purpose} certificate {plan.primary.thumbprint} primary again (the last"
            f" promotion retired it; valid until {plan.primary.not_after:%Y-%m-%dT%H:%M:%SZ})",
            f"make the {purpose} primary {plan.secondary.thumbprint} secondary again, its"
            " promotion held until `farmkeys rollover` or the critical threshold at"
            f" {critical_at:%Y-%m-%dT%H:%M:%SZ}",
        ]
        if purpose == "signing":
            lines.append(
                "sign with the old key at once: relying parties that already dropped it reject"
                " the tokens it signs until they re-fetch the metadata"
            )
        else:
            lines.append(
                "decrypt with the old key again; tokens encrypted to the new one still decrypt,"
                " as it stays installed as the secondary"
            )
        return lines, "Revert now?"

    return review


def confirmed(what: str, lines: Sequence[str], question: str, *, yes: bool) -> bool:
    """Show what ``what`` will do, then :func:`asked`."""
    print(f"{what} will:")
    for line in lines:
        print(f"  {escape(line)}")
    return asked(what, question, yes=yes)


def asked(what: str, question: str, *, yes: bool) -> bool:
    """Ask ``question`` at a terminal; ``yes`` skips it. Without a terminal and without
    ``yes``, a :class:`RequestRefusedError`: nothing is done."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise RequestRefusedError(
            f"{what} needs confirmation and there is no terminal to ask at",
            "review the lines above and run it again with --yes; nothing was changed",
        )
    if input(f"{question} [y/N] ").strip().lower() in ("y", "yes"):
        return True
    print(f"{what}: nothing was changed")
    return False


def _repair_state(args: argparse.Namespace, config: Config) -> int:
    from farmkeys import repair, requesting
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
        if not asked("repair-state", "Authenticate them?", yes=args.yes):
            return EXIT_ERROR
        outcome = requesting.request_rollover(
            config,
            db,
            directory,
            purpose="all",
            urgent=False,
            repair=review.terms,
            timeout_seconds=args.wait,
            reason=args.reason,
        )
    return _answer("repair-state", outcome)


def _request(
    args: argparse.Namespace,
    config: Config,
    kind: str,
    *,
    purpose: str | None,
    urgent: bool = False,
    review: Review | None = None,
) -> int:
    """Ask the leader (or, when no node leads, act under the lease) and print its answer;
    with ``review``, first show what it will do and ask (:func:`confirmed`)."""
    what = f"{kind} --urgent" + (" --master-key" if purpose is None else "")
    outcome = _filed(args, config, what=what, purpose=purpose, urgent=urgent, review=review)
    return EXIT_ERROR if outcome is None else _answer(kind, outcome)


def _filed(
    args: argparse.Namespace,
    config: Config,
    *,
    what: str,
    purpose: str | None,
    urgent: bool = False,
    revert: bool = False,
    review: Review | None = None,
) -> RolloverOutcome | None:
    """A rollover request filed and answered (:func:`farmkeys.requesting.request_rollover`);
    with ``review``, shown and confirmed first: None when the operator said no."""
    from farmkeys import requesting
    from farmkeys.db import ConfigDB
    from farmkeys.directory import Directory

    with (
        ConfigDB(config.database, config.retry) as db,
        Directory(config.directory, config.retry) as directory,
    ):
        if review is not None:
            lines, question = review(db, directory)
            if not confirmed(what, lines, question, yes=args.yes):
                return None
        return requesting.request_rollover(
            config,
            db,
            directory,
            purpose=purpose,
            urgent=urgent,
            timeout_seconds=args.wait,
            reason=args.reason,
            revert=revert,
        )


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
            reason=args.reason,
        )
    if not outcome.ok:
        raise ImportRefusedError(
            f"{outcome.done_by or 'the leader'} answered import request {outcome.request}:"
            f" {' '.join(outcome.result.split())}",
            "nothing was changed; correct the input, or check `farmkeys status`, and try again",
        )
    return _answer("import", outcome)


def _answer(kind: str, outcome: RolloverOutcome) -> int:
    """Print the leader's answer to a request; the exit code it means."""
    for line in answer_lines(kind, outcome):
        print(line)
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
                config,
                db,
                directory,
                out=Path(args.out),
                passphrase=passphrase,
                now=_now(),
                by=requester(args.reason),
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
            config,
            db,
            directory,
            path=Path(args.file),
            passphrase=passphrase,
            by=requester(args.reason),
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
        events = db.events(since=args.since)
    if args.json:
        print(events_json(events, pretty=sys.stdout.isatty()))
        return EXIT_OK
    for line in events_text(events):
        print(line)
    return EXIT_OK


HANDLERS: dict[str, Callable[[argparse.Namespace, Config], int]] = {
    "init": _init,
    "db": _db_upgrade,
    "check": check_command,
    "nodes": nodes_command,
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
"""The function that runs each command, by its name on the command line."""
