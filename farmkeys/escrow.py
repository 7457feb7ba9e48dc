"""Escrow: the farm's master keys sealed under a passphrase, the way back from a lost DKM
container.

`farmkeys escrow export` writes every master key the directory still holds
(with its id, creation time, whether it is current, and the farm's name and
DKM group) as one JSON document, sealed in the age format under a
passphrase (:mod:`farmkeys.agefmt`), so the file also opens with the
standard ``age -d`` tool, without farmkeys. `farmkeys escrow import` puts
the keys back: it re-creates the DKM container and its CryptoPolicy when
they are gone, adds the keys that are missing, refuses a file of another
farm, never replaces a key that exists with other bytes, and never brings
back a key the farm deleted (a shredded key stays shredded). Both are
audited in the config DB.

The sealed document, version 1::

    {"format": "farmkeys-escrow", "version": 1,
     "farm": "<farm name>", "dkm_group": "<guid>", "exported_at": "<ISO 8601>",
     "keys": [{"id": "<guid>", "created_at": "<ISO 8601 or null>",
               "current": true|false, "key": "<32 bytes, base64>"}, ...]}

The file is worth exactly what the directory's DKM container is worth, to
whoever also knows the passphrase; without it, nothing (scrypt, age's
default work factor). Key bytes appear in no log line, message or repr.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import getpass
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

from farmkeys import policy
from farmkeys.config import Config
from farmkeys.db import ConfigDB, MasterKeyRow
from farmkeys.directory import MASTER_KEY_LENGTH, Directory
from farmkeys.errors import (
    DirectoryError,
    EscrowError,
    FarmStateError,
    MasterKeyMissingError,
)
from farmkeys.file_trust import read_private_file
from farmkeys.formats import escrow_file, farm_state
from farmkeys.formats.request import Requester

log = logging.getLogger(__name__)

FORMAT: Final = "farmkeys-escrow"
VERSION: Final = 1
MIN_PASSPHRASE: Final = 12
"""The shortest passphrase `escrow export` accepts, in characters."""


@dataclass(frozen=True)
class EscrowedKey:
    id: uuid.UUID
    created_at: datetime | None
    current: bool
    key: bytes = field(repr=False)


@dataclass(frozen=True)
class EscrowDocument:
    """What an escrow file holds once opened."""

    farm: str
    dkm_group: uuid.UUID
    exported_at: datetime
    keys: tuple[EscrowedKey, ...]

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "farm": self.farm,
                "dkm_group": str(self.dkm_group),
                "exported_at": self.exported_at.isoformat(),
                "keys": [
                    {
                        "id": str(k.id),
                        "created_at": None if k.created_at is None else k.created_at.isoformat(),
                        "current": k.current,
                        "key": base64.b64encode(k.key).decode("ascii"),
                    }
                    for k in self.keys
                ],
            },
            indent=1,
        ).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes, *, source: str) -> EscrowDocument:
        """Parse an opened escrow file; :class:`EscrowError` for anything unexpected."""

        def bad(why: str) -> EscrowError:
            return EscrowError(
                f"escrow file {source} opened but is not a farmkeys escrow document: {why}",
                "use a file that `farmkeys escrow export` wrote",
            )

        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("its content is not JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise bad(f'no "format": "{FORMAT}"')
        if doc.get("version") != VERSION:
            raise bad(f"version {doc.get('version')!r}, this farmkeys reads {VERSION}")
        try:
            keys = []
            for entry in doc["keys"]:
                key = base64.b64decode(entry["key"], validate=True)
                if len(key) != MASTER_KEY_LENGTH:
                    raise ValueError("a key is not 32 bytes")
                created = entry["created_at"]
                keys.append(
                    EscrowedKey(
                        id=uuid.UUID(entry["id"]),
                        created_at=None if created is None else datetime.fromisoformat(created),
                        current=entry["current"] is True,
                        key=key,
                    )
                )
            if len({k.id for k in keys}) != len(keys):
                raise ValueError("a key id appears twice")
            return cls(
                farm=str(doc["farm"]),
                dkm_group=uuid.UUID(doc["dkm_group"]),
                exported_at=datetime.fromisoformat(doc["exported_at"]),
                keys=tuple(keys),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise bad(f"a field is missing or malformed ({type(exc).__name__})") from None


# -- the passphrase ------------------------------------------------------------------------


def read_passphrase(
    path: str | None,
    *,
    confirm: bool,
    minimum: int = 0,
    ask: Callable[[str], str] = getpass.getpass,
) -> bytes:
    """The passphrase: the first line of ``path``, else asked on the terminal (twice when
    ``confirm``). Never from the command line or the environment.

    A passphrase file must be a regular file that neither group nor others
    may read or write, and not empty.
    """
    if path is not None:
        text = _read_passphrase_file(Path(path))
    else:
        if not sys.stdin.isatty():
            raise EscrowError(
                "no terminal to ask for the escrow passphrase on",
                "give --passphrase-file with a file readable by you alone (chmod 600)",
            )
        text = ask("Escrow passphrase: ")
        if confirm and ask("Escrow passphrase, again: ") != text:
            raise EscrowError(
                "the two passphrases differ", "run the command again and type the same one twice"
            )
    if not text:
        raise EscrowError("the escrow passphrase is empty", "give a long passphrase")
    if len(text) < minimum:
        raise EscrowError(
            f"the escrow passphrase has {len(text)} characters, fewer than {minimum}",
            f"choose one of at least {minimum}: it is all that protects the master keys"
            " in the file",
        )
    return text.encode("utf-8")


def _read_passphrase_file(path: Path) -> str:
    raw = read_private_file(path, what="passphrase file", error=EscrowError)
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise EscrowError(f"passphrase file {path} is not UTF-8 text", "write it as text") from None
    if not lines or not lines[0]:
        raise EscrowError(
            f"passphrase file {path} is empty", "write the passphrase on its first line"
        )
    return lines[0]


# -- export ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportReport:
    path: Path
    farm: str
    dkm_group: uuid.UUID
    keys: tuple[uuid.UUID, ...]
    current: uuid.UUID | None


def export_keys(
    config: Config,
    db: ConfigDB,
    directory: Directory,
    *,
    out: Path,
    passphrase: bytes,
    now: datetime,
    work_factor: int = escrow_file.DEFAULT_WORK_FACTOR,
    by: Requester | None = None,
) -> ExportReport:
    """Write every master key the directory holds, sealed under ``passphrase``, to ``out``.

    ``out`` must not exist; it appears (mode 0600) only once the export is
    audited, complete or not at all.
    """
    if out.exists() or out.is_symlink():
        raise EscrowError(f"{out} already exists", "choose a new file name; nothing was written")
    if not out.parent.is_dir():
        raise EscrowError(
            f"the folder of {out} does not exist", "create it, or choose another path"
        )
    farm = db.require_farm()
    group = farm.dkm_group
    recorded = {k.id: k.stage for k in db.master_keys()}
    infos = directory.list_keys(group)
    keys = tuple(
        EscrowedKey(
            id=info.id,
            created_at=info.created_at,
            current=recorded.get(info.id) == "current" if recorded else info.current,
            key=directory.master_key(group, info.id),
        )
        for info in infos
    )
    document = EscrowDocument(farm=farm.name, dkm_group=group, exported_at=now, keys=keys)
    sealed = escrow_file.encrypt(document.to_json(), passphrase, work_factor=work_factor)
    partial = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        _write_new(partial, sealed)
        ids = ", ".join(str(k.id) for k in keys)
        with db.transaction() as tx:
            tx.audit(
                node=config.node.id,
                term=None,
                action="escrow_export",
                detail=f"{len(keys)} master keys ({ids}) sealed under a passphrase into {out}",
                by=by,
            )
            try:
                os.link(partial, out)  # fails rather than replace a file made meanwhile
            except OSError as exc:
                raise EscrowError(
                    f"cannot create {out}: {exc.strerror}",
                    "choose another path; nothing was written",
                ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    current = next((k.id for k in keys if k.current), None)
    log.info("exported %d master keys of DKM group %s to %s", len(keys), group, out)
    return ExportReport(out, farm.name, group, tuple(k.id for k in keys), current)


def _write_new(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise EscrowError(
            f"cannot write in the folder of {path.parent}: {exc.strerror}",
            "choose a folder you may write to",
        ) from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


# -- import ---------------------------------------------------------------------------------


@dataclass
class ImportReport:
    farm: str
    dkm_group: uuid.UUID
    recreated_container: bool = False
    restored: list[uuid.UUID] = field(default_factory=list)
    present: list[uuid.UUID] = field(default_factory=list)
    skipped_deleted: list[uuid.UUID] = field(default_factory=list)


def open_escrow(path: Path, passphrase: bytes) -> EscrowDocument:
    """Read and open an escrow file; :class:`EscrowError` for every way it can fail."""
    try:
        with path.open("rb") as handle:
            data = handle.read(escrow_file.MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise EscrowError(
            f"cannot read escrow file {path}: {exc.strerror}", "check the path"
        ) from None
    try:
        raw = escrow_file.decrypt(data, passphrase)
    except EscrowError as exc:
        raise EscrowError(f"escrow file {path}: {exc.what}", exc.todo) from None
    return EscrowDocument.from_json(raw, source=str(path))


def import_keys(
    config: Config,
    db: ConfigDB,
    directory: Directory,
    *,
    path: Path,
    passphrase: bytes,
    by: Requester | None = None,
) -> ImportReport:
    """Put the master keys of an escrow file back into the directory.

    Everything is checked before anything is written: the file opens, it is
    this farm's, and no key it holds exists in the directory with other bytes.
    """
    document = open_escrow(path, passphrase)
    farm = db.require_farm()
    if document.dkm_group != farm.dkm_group:
        raise EscrowError(
            f"escrow file {path} holds the keys of farm {document.farm!r} (DKM group"
            f" {document.dkm_group}), not of this farm {farm.name!r} (DKM group {farm.dkm_group})",
            "import it into its own farm; nothing was changed",
        )
    group = farm.dkm_group
    recorded = {k.id: k for k in db.master_keys()}
    report = ImportReport(farm=farm.name, dkm_group=group)
    shredded = _tombstones(db, directory, document, path)
    wanted = []
    for escrowed in document.keys:
        if escrowed.id in shredded:
            report.skipped_deleted.append(escrowed.id)
            continue
        wanted.append(escrowed)
    report.present += _present(directory, group, wanted, path)
    current = _current_key(recorded.values(), document, path)
    report.recreated_container = directory.restore_container(
        group, farm_name=farm.name, current=current
    )
    for escrowed in wanted:
        if escrowed.id not in report.present and directory.ensure_key(
            group, escrowed.id, escrowed.key
        ):
            report.restored.append(escrowed.id)
    _record_import(config, db, wanted, recorded, current, report, path, by)
    log.info("%s", _import_detail(report, path))
    return report


def _present(
    directory: Directory, group: uuid.UUID, wanted: list[EscrowedKey], path: Path
) -> list[uuid.UUID]:
    """The keys of ``wanted`` the directory already holds; :class:`EscrowError` when it
    holds one with other bytes than the file."""
    present = []
    container_exists = directory.container_exists(group)
    for escrowed in wanted:
        held = _held(directory, group, escrowed.id) if container_exists else None
        if held is None:
            continue
        if held != escrowed.key:
            raise EscrowError(
                f"master key {escrowed.id} exists in the directory with other bytes than"
                f" escrow file {path} holds",
                "nothing was changed; find out which is genuine before touching either",
            )
        present.append(escrowed.id)
    return present


def _current_key(
    recorded: Iterable[MasterKeyRow], document: EscrowDocument, path: Path
) -> uuid.UUID:
    """The key the farm records as current, else the one the file names current."""
    recorded_current = policy.current_key(recorded)
    current = None if recorded_current is None else recorded_current.id
    if current is None:
        current = next((k.id for k in document.keys if k.current), None)
    if current is None:
        raise EscrowError(
            f"escrow file {path} names no current master key and the farm records none",
            "nothing was changed; import a complete escrow file",
        )
    return current


def _record_import(
    config: Config,
    db: ConfigDB,
    wanted: list[EscrowedKey],
    recorded: Mapping[uuid.UUID, MasterKeyRow],
    current: uuid.UUID,
    report: ImportReport,
    path: Path,
    by: Requester | None,
) -> None:
    """Record the keys the farm did not know, and audit the import, in one transaction."""
    with db.transaction() as tx:
        for escrowed in wanted:
            if escrowed.id not in recorded:
                tx.record_master_key(
                    escrowed.id,
                    stage="current" if escrowed.id == current else "previous",
                    created_at=escrowed.created_at,
                    reason=f"imported from escrow file {path}",
                )
        tx.audit(
            node=config.node.id,
            term=None,
            action="escrow_import",
            detail=_import_detail(report, path),
            by=by,
        )


def _tombstones(
    db: ConfigDB, directory: Directory, document: EscrowDocument, path: Path
) -> frozenset[uuid.UUID]:
    """The master keys the farm shredded, from its authenticated farm state record
    (verified under the key it names, from the escrow file or else the directory), never
    from the ``master_key`` table, which a config DB writer can edit. A record from before
    tombstones (format 1) lists none: then the table's ``deleted`` keys are kept out too,
    as before (that can only refuse a restore, never make one). No record that verifies:
    :class:`EscrowError`, nothing restored."""
    group = document.dkm_group
    stored = db.stored_state()
    if stored is None:
        raise EscrowError(
            "the config DB has no farm state record, so which master keys the farm shredded"
            " cannot be told",
            "restore the config DB from a backup first; nothing was changed",
        )
    escrowed = {k.id: k.key for k in document.keys}

    def key_for(key_id: uuid.UUID) -> bytes:
        # The directory's key first: a key the file holds with other bytes is refused later,
        # by name, and must not make the record look forged.
        try:
            return directory.master_key(group, key_id)
        except DirectoryError:
            if key_id in escrowed:
                return escrowed[key_id]
            raise

    try:
        state = farm_state.verify(stored.body, stored.mac, farm=group, key_for=key_for)
    except (FarmStateError, DirectoryError) as exc:
        raise EscrowError(
            f"the farm state record, which lists the master keys the farm shredded, cannot"
            f" be verified: {exc.what}",
            f"use an escrow file that holds the master key the record names ({path} does"
            " not, or the record is forged), or restore the config DB from a backup; nothing"
            " was changed",
        ) from None
    if state.format == farm_state.FORMAT_1:
        return frozenset(k.id for k in db.master_keys() if k.stage == "deleted")
    return frozenset(state.shredded)


def _held(directory: Directory, group: uuid.UUID, key_id: uuid.UUID) -> bytes | None:
    try:
        return directory.master_key(group, key_id)
    except MasterKeyMissingError:
        return None


def _import_detail(report: ImportReport, path: Path) -> str:
    def ids(keys: list[uuid.UUID]) -> str:
        return ", ".join(map(str, keys)) or "none"

    parts = [f"escrow file {path}:"]
    if report.recreated_container:
        parts.append("re-created the DKM container;")
    parts.append(f"restored {ids(report.restored)};")
    parts.append(f"already present {ids(report.present)}")
    if report.skipped_deleted:
        parts[-1] += f"; not restored, deleted by the farm: {ids(report.skipped_deleted)}"
    return " ".join(parts)
