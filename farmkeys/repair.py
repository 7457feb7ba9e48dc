"""The operator's side of `farmkeys repair-state`: what the repair would vouch for.

`repair-state` asks the leader to authenticate the config DB's live rows as
the farm state, so it must vouch for exactly what the operator saw. This
module reads the live rows, the stored record (verified if it can be) and
what the nodes report, and builds a :class:`Review`: every difference from
the last authentic record, the revoked thumbprints the new record keeps, the
version it takes, and the warnings the operator must weigh (thumbprints nodes
remember as revoked that the repair would not keep; node versions too far
ahead to be honest). Its :attr:`Review.terms` are what the request's MAC
covers (:class:`farmkeys.formats.request.RepairTerms`): the leader writes nothing if
the rows differ when it acts.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

from farmkeys.db import CertificateRow, ConfigDB, StoredState
from farmkeys.directory import Directory
from farmkeys.errors import ConfigError, DirectoryError, FarmStateError
from farmkeys.formats import farm_state, request

_THUMBPRINT = re.compile(r"\A[0-9A-F]{40}\Z")
_MAX_REVOKED_FILE = 1 << 20


@dataclass(frozen=True)
class Review:
    """What a repair would authenticate, for the operator to confirm."""

    lines: list[str]  # every difference and warning, one line each
    terms: request.RepairTerms
    needed: bool  # False: the record verifies, matches the rows, and nothing would change


def read_revoked_file(path: Path) -> tuple[str, ...]:
    """The thumbprints in ``path``: one per line (SHA-1, hex, any case, colons allowed);
    blank lines and ``#`` comments are skipped. :class:`ConfigError` for anything else."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_REVOKED_FILE + 1)
    except OSError as exc:
        raise ConfigError(
            f"cannot read the revoked-thumbprints file {path}: {exc.strerror}",
            "give a file with one urgently replaced thumbprint per line",
        ) from None
    if len(raw) > _MAX_REVOKED_FILE:
        raise ConfigError(
            f"the revoked-thumbprints file {path} is larger than {_MAX_REVOKED_FILE} bytes",
            "give a file with one urgently replaced thumbprint per line",
        )
    found = []
    for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        text = line.split("#", 1)[0].strip().replace(":", "").upper()
        if not text:
            continue
        if not _THUMBPRINT.match(text):
            raise ConfigError(
                f"line {number} of {path} is not a SHA-1 thumbprint (40 hex digits)",
                "give a file with one urgently replaced thumbprint per line",
            )
        found.append(text)
    return tuple(sorted(set(found)))


def review(db: ConfigDB, directory: Directory, *, revoked_file: tuple[str, ...] | None) -> Review:
    """What `repair-state` would vouch for now; ``revoked_file``: the thumbprints the
    operator named (None: not given)."""
    farm = db.require_farm()
    rows = db.certificates(include_archived=False)
    entries = [farm_state.LiveEntry.of(r) for r in rows]
    stored = db.stored_state()
    previous, unverified, why = _read_record(stored, farm.dkm_group, directory)
    keep = set(revoked_file or ())
    lines: list[str] = []
    if previous is not None:
        keep |= set(previous.revoked)
        lines += _differences(previous, stored, rows)
    else:
        lines += _unverified(why, unverified, revoked_file)
    for entry in entries:
        if entry.thumbprint in keep:
            lines.append(f"{entry.describe()} is revoked: the repair archives it again")
    floor = 0 if previous is None else previous.version
    version, ahead_lines = _next_version(db, floor)
    lines += ahead_lines
    for thumbprint, holders in sorted(_remembered(db).items()):
        if thumbprint not in keep:
            lines.append(
                f"node(s) {', '.join(repr(h) for h in holders)} remember {thumbprint} as"
                " urgently replaced, and the repair would not keep it revoked: add it to"
                " --revoked FILE to keep it"
            )
    terms = request.RepairTerms(
        rows=request.rows_digest(entries),
        revoked=tuple(sorted(keep)),
        revoked_named=revoked_file is not None,
        min_version=version,
    )
    needed = previous is None or bool(lines) or not keep <= set(previous.revoked)
    return Review(lines=lines, terms=terms, needed=needed)


def _read_record(
    stored: StoredState | None, dkm_group: uuid.UUID, directory: Directory
) -> tuple[farm_state.FarmState | None, farm_state.FarmState | None, str]:
    """The stored record: (verified, else None; parsed but unverified, else None; why it
    does not verify, else empty)."""
    if stored is None:
        return None, None, "the config DB has no farm state record"
    try:
        previous = farm_state.verify(
            stored.body,
            stored.mac,
            farm=dkm_group,
            key_for=lambda key_id: directory.master_key(dkm_group, key_id),
        )
    except (FarmStateError, DirectoryError) as exc:
        try:
            unverified = farm_state.parse(stored.body)
        except FarmStateError:
            unverified = None
        return None, unverified, exc.what
    return previous, None, ""


def _differences(
    previous: farm_state.FarmState, stored: StoredState | None, rows: list[CertificateRow]
) -> list[str]:
    """How the live rows differ from the last authentic record, and a version column that
    disagrees with it."""
    lines = [
        f"differs from authentic version {previous.version}: {d}"
        for d in previous.differences(rows)
    ]
    if stored is not None and stored.version != previous.version:
        lines.append(
            f"the farm_state row's version column says {stored.version}, its authentic"
            f" record {previous.version}: the column is ignored"
        )
    return lines


def _unverified(
    why: str, unverified: farm_state.FarmState | None, revoked_file: tuple[str, ...] | None
) -> list[str]:
    """What the operator must know when no record verifies."""
    lines = [f"no farm state record verifies ({why})"]
    if unverified is not None and unverified.revoked:
        lines.append(
            "the unverified record lists as revoked (not trusted; put those you know"
            f" to be right in --revoked FILE): {', '.join(unverified.revoked)}"
        )
    if revoked_file is None:
        lines.append(
            "refused unless you name the urgently replaced thumbprints to keep with"
            " --revoked FILE (an empty file if there are none)"
        )
    return lines


def _next_version(db: ConfigDB, floor: int) -> tuple[int, list[str]]:
    """The version the new record takes: above ``floor`` (the last authentic one) and every
    version a node reports installed, except those too far ahead to be honest; and the
    lines that say so."""
    lines = []
    ahead = 0
    for n in db.nodes():
        if n.state_version is None:
            continue
        if n.state_version > floor + farm_state.MAX_VERSION_STEP:
            lines.append(
                f"node {n.id!r} reports farm state version {n.state_version}, more than"
                f" {farm_state.MAX_VERSION_STEP} above the last authentic one: ignored (forged?)"
            )
        else:
            ahead = max(ahead, n.state_version)
    version = max(floor, ahead) + 1
    if ahead > floor:
        lines.append(
            f"nodes installed farm state versions up to {ahead}, above the last authentic"
            f" {floor}: the new record is version {version}"
        )
    return version, lines


def _remembered(db: ConfigDB) -> dict[str, list[str]]:
    """The thumbprints nodes report they remember as urgently replaced, by thumbprint."""
    found: dict[str, list[str]] = {}
    for node, revoked in db.revoked_by_node():
        for thumbprint in revoked:
            found.setdefault(thumbprint, []).append(node)
    return found
