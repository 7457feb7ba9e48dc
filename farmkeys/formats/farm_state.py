"""The farm state record: which certificate holds which role, authenticated.

The blobs in the config DB are sealed, but their rows' roles are not: whoever
can write the config DB could make an archived (perhaps compromised)
certificate the primary again, or put back rows from an old backup. So the
leader writes, with every change, one record of the whole live set:

- ``version``: strictly increasing; every node remembers the highest it has
  installed (its store's manifest) and refuses a lower one (an old backup);
- ``live``: each live certificate's id, purpose, role, thumbprint and the
  master key its blob is sealed under;
- ``revoked``: the thumbprints an urgent rollover replaced, which no node
  installs again;
- ``master_key``: the master key the record's MAC is made under (the
  current one when it was written; a master-key roll re-authenticates it);
- ``shredded`` (format 2): the master keys the leader deleted from the
  directory, which `escrow import` never restores (the tombstones; the
  ``master_key`` table's ``deleted`` state is only a copy for reading);
- ``replaced`` (format 2): each master key the leader replaced and has not yet
  deleted, with when (and whether urgently), so a DB writer who edits the
  ``master_key`` table cannot make the leader delete a key sooner than its
  retention (deleting is irreversible: it shreds what was sealed under it);
- ``answered`` (format 2): the operator requests (:mod:`farmkeys.formats.request`)
  the leader carried out that are not yet expired, by nonce, so an authentic
  request copied back into the queue is refused instead of done twice;
- ``promotions`` (format 3): per purpose, the last change of its primary (when, the
  primary it made, the one it replaced, whether urgently), kept while that primary is
  the primary: what `rollover --revert` may undo, never a DB writer's choice;
- ``holds`` (format 3): per purpose, the secondary whose scheduled promotion a revert
  holds (and since when), kept while it is the secondary: until `rollover` releases it,
  the policy promotes it only at the primary's critical threshold;

and a MAC: HMAC-SHA256 over the record's bytes under a key derived from that
master key with HKDF-SHA256 and a label of its own (:data:`MAC_INFO` and the
farm's DKM group), so it cannot be mistaken for a blob key, nor carried to
another farm. The record's bytes are canonical JSON (sorted keys, no
spaces, ASCII): :func:`parse` accepts exactly the bytes :meth:`FarmState.encode`
makes, and nothing else. docs/blob-format.md gives the format field by field.

Written in the lowest format that carries the record: format 3 when it has a promotion
or a hold, else format 2, so a farm's records stay readable by the farmkeys before
format 3 until its first promotion after the upgrade. Formats 1 and 2 are still read.

Pure: no I/O. The leader (:mod:`farmkeys.leader`), `init`, the nodes
(:mod:`farmkeys.sync`) and `status` call it with the key they read.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from farmkeys.errors import FarmStateError
from farmkeys.formats import _canonical, _mac
from farmkeys.formats.certificate_row import Published
from farmkeys.vocab import LIVE_ROLES, PURPOSES

FORMAT = "farmkeys-state/3"
FORMAT_2 = "farmkeys-state/2"  # before promotions and holds (issue 23): still read and written
FORMAT_1 = "farmkeys-state/1"  # before tombstones and answered requests: still read
FORMATS = (FORMAT, FORMAT_2, FORMAT_1)
MAC_INFO = b"farmkeys farm state MAC v1\x00"
MAC_SIZE = 32
MAX_RECORD = 1 << 20  # far above any farm's: a live set is a handful of rows
MAX_VERSION = _canonical.MAX_INTEGER  # the config DB's bigint
MAX_VERSION_STEP = 1 << 32
"""The most a version may rise over the last authentic one (repair-state past a restored
backup); a farm makes a handful of versions a day, so this bound is never met honestly."""
MAX_ANSWERED = 4096  # unexpired answered requests a record keeps; far above any farm's

_THUMBPRINT = re.compile(r"\A[0-9A-F]{40}\Z")
_FIELDS_1 = {"farm", "format", "live", "master_key", "revoked", "term", "version"}
_FIELDS_2 = _FIELDS_1 | {"answered", "replaced", "shredded"}
_FIELDS = _FIELDS_2 | {"holds", "promotions"}
_FIELDS_OF = {FORMAT: _FIELDS, FORMAT_2: _FIELDS_2, FORMAT_1: _FIELDS_1}
_PROMOTION_FIELDS = {"at", "previous", "primary", "purpose", "urgent"}
_HOLD_FIELDS = {"purpose", "secondary", "since"}
_ANSWERED_FIELDS = {"expires", "request"}
_REPLACED_FIELDS = {"at", "key", "urgent"}
_ENTRY_FIELDS = {"id", "master_key", "purpose", "role", "thumbprint"}

REPAIR = "restore the config DB from a backup, or run `farmkeys repair-state` as the leader"


def _malformed(why: str) -> FarmStateError:
    return FarmStateError(f"the config DB's farm state record is malformed: {why}", REPAIR)


_read = _canonical.Reader(_malformed, integers=f"an integer from 0 to {MAX_VERSION}")
"""The canonical JSON reader of records, whose refusals say the record is malformed."""


class LiveRow(Published, Protocol):
    """What the record takes from a certificate row (CertificateRow has it)."""

    @property
    def master_key(self) -> uuid.UUID: ...


@dataclass(frozen=True, order=True)
class LiveEntry:
    """One live certificate as the record names it."""

    id: uuid.UUID
    purpose: str
    role: str
    thumbprint: str
    master_key: uuid.UUID

    @classmethod
    def of(cls, row: LiveRow) -> LiveEntry:
        return cls(row.id, row.purpose, row.role, row.thumbprint, row.master_key)

    def describe(self) -> str:
        return f"{self.purpose} {self.role} {self.thumbprint}"


@dataclass(frozen=True, order=True)
class Answered:
    """An operator request the leader carried out: its nonce, and when it expires (seconds
    since the epoch, by the config DB's clock); after that it is refused as stale anyway."""

    request: uuid.UUID
    expires: int


@dataclass(frozen=True, order=True)
class Replaced:
    """A master key the leader replaced: when (seconds since the epoch, the config DB's
    clock), and whether urgently (then it is deleted at once, not after ``retain``)."""

    key: uuid.UUID
    at: int
    urgent: bool


@dataclass(frozen=True)
class Promotion:
    """The last change of one purpose's primary (format 3): at ``at`` (seconds since the
    epoch, the config DB's clock) ``primary`` became the primary, replacing ``previous``
    (None: there was none), which was retired, or archived and revoked when ``urgent``."""

    purpose: str
    at: int
    primary: uuid.UUID
    previous: uuid.UUID | None
    urgent: bool


@dataclass(frozen=True)
class Hold:
    """A revert's hold on one purpose (format 3): ``secondary`` (the primary the revert
    demoted) is not promoted on its schedule, only at the primary's critical threshold,
    until `farmkeys rollover` releases it; ``since``: the revert's time (seconds since the
    epoch, the config DB's clock)."""

    purpose: str
    secondary: uuid.UUID
    since: int


@dataclass(frozen=True)
class FarmState:
    """One version of the farm state (not yet authentic until :func:`verify` says so)."""

    farm: uuid.UUID
    version: int
    term: int | None  # the leader's term that wrote it; None for `init`
    master_key: uuid.UUID
    live: tuple[LiveEntry, ...]  # sorted by id
    revoked: tuple[str, ...]  # sorted
    shredded: tuple[uuid.UUID, ...] = ()  # sorted
    answered: tuple[Answered, ...] = ()  # sorted by nonce
    replaced: tuple[Replaced, ...] = ()  # sorted by key
    promotions: tuple[Promotion, ...] = ()  # sorted by purpose, one each at most
    holds: tuple[Hold, ...] = ()  # sorted by purpose, one each at most
    format: str = FORMAT_2  # build() chooses; FORMAT_1 only for a record read from before

    @classmethod
    def build(
        cls,
        *,
        farm: uuid.UUID,
        version: int,
        term: int | None,
        master_key: uuid.UUID,
        rows: Iterable[LiveRow],
        revoked: Iterable[str] = (),
        shredded: Iterable[uuid.UUID] = (),
        answered: Iterable[Answered] = (),
        replaced: Iterable[Replaced] = (),
        promotions: Iterable[Promotion] = (),
        holds: Iterable[Hold] = (),
    ) -> FarmState:
        """The record of ``rows`` (the live certificates), in canonical order. Of two
        ``answered`` entries for one request, the later expiry is kept. Of ``promotions``
        and ``holds``, the last given for a purpose, and only while it still names that
        purpose's primary (a promotion) or secondary (a hold); format 3 when any is left,
        else format 2."""
        live = tuple(sorted(LiveEntry.of(r) for r in rows))
        holding = {(e.purpose, e.role): e.id for e in live}
        kept_promotions = tuple(
            sorted(
                (
                    p
                    for p in {p.purpose: p for p in promotions}.values()
                    if holding.get((p.purpose, "primary")) == p.primary
                ),
                key=lambda p: p.purpose,
            )
        )
        kept_holds = tuple(
            sorted(
                (
                    h
                    for h in {h.purpose: h for h in holds}.values()
                    if holding.get((h.purpose, "secondary")) == h.secondary
                ),
                key=lambda h: h.purpose,
            )
        )
        shredded = set(shredded)
        latest: dict[uuid.UUID, int] = {}
        for a in answered:
            latest[a.request] = max(a.expires, latest.get(a.request, a.expires))
        return cls(
            farm,
            version,
            term,
            master_key,
            live,
            tuple(sorted(set(revoked))),
            tuple(sorted(shredded)),
            tuple(sorted(Answered(r, e) for r, e in latest.items())),
            tuple(sorted({r.key: r for r in replaced if r.key not in shredded}.values())),
            kept_promotions,
            kept_holds,
            FORMAT if kept_promotions or kept_holds else FORMAT_2,
        )

    def promotion(self, purpose: str) -> Promotion | None:
        """The last change of ``purpose``'s primary the record keeps, or None."""
        return next((p for p in self.promotions if p.purpose == purpose), None)

    def hold(self, purpose: str) -> Hold | None:
        """The revert's hold on ``purpose``'s secondary, or None."""
        return next((h for h in self.holds if h.purpose == purpose), None)

    def held_secondaries(self) -> frozenset[uuid.UUID]:
        """The secondaries whose scheduled promotion a revert holds."""
        return frozenset(h.secondary for h in self.holds)

    def replaced_key(self, key: uuid.UUID) -> Replaced | None:
        return next((r for r in self.replaced if r.key == key), None)

    def answered_now(self, now: int) -> tuple[Answered, ...]:
        """The answered requests not yet expired at ``now`` (seconds since the epoch)."""
        return tuple(a for a in self.answered if a.expires >= now)

    def has_answered(self, request: uuid.UUID) -> bool:
        return any(a.request == request for a in self.answered)

    def encode(self) -> bytes:
        """The record's canonical bytes: what the MAC covers and the config DB stores."""
        document: dict[str, object] = {
            "farm": str(self.farm),
            "live": [
                {
                    "id": str(e.id),
                    "master_key": str(e.master_key),
                    "purpose": e.purpose,
                    "role": e.role,
                    "thumbprint": e.thumbprint,
                }
                for e in self.live
            ],
            "master_key": str(self.master_key),
            "revoked": list(self.revoked),
            "term": self.term,
            "version": self.version,
        }
        if self.format == FORMAT:
            document["promotions"] = [
                {
                    "at": p.at,
                    "previous": None if p.previous is None else str(p.previous),
                    "primary": str(p.primary),
                    "purpose": p.purpose,
                    "urgent": p.urgent,
                }
                for p in self.promotions
            ]
            document["holds"] = [
                {"purpose": h.purpose, "secondary": str(h.secondary), "since": h.since}
                for h in self.holds
            ]
        elif self.promotions or self.holds:
            raise ValueError(f"a record of format {self.format} carries no promotions or holds")
        if self.format != FORMAT_1:
            document["format"] = self.format
            document["shredded"] = [str(k) for k in self.shredded]
            document["answered"] = [
                {"expires": a.expires, "request": str(a.request)} for a in self.answered
            ]
            document["replaced"] = [
                {"at": r.at, "key": str(r.key), "urgent": r.urgent} for r in self.replaced
            ]
        else:
            document["format"] = FORMAT_1
        return _canonical.encode(document)

    def same_content(self, other: FarmState) -> bool:
        """The same live set, revoked list, tombstones and answered requests (version, term
        and MAC key aside), in the same format."""
        return (
            self.live == other.live
            and self.revoked == other.revoked
            and self.shredded == other.shredded
            and self.answered == other.answered
            and self.replaced == other.replaced
            and self.promotions == other.promotions
            and self.holds == other.holds
            and self.format == other.format
        )

    def differences(self, rows: Iterable[LiveRow]) -> list[str]:
        """How the config DB's live rows differ from this record; empty when they agree."""
        recorded = {e.id: e for e in self.live}
        found = {r.id: LiveEntry.of(r) for r in rows}
        lines = []
        for cert_id in sorted(recorded.keys() | found.keys()):
            want, have = recorded.get(cert_id), found.get(cert_id)
            if have == want:
                continue
            if want is None:
                assert have is not None
                lines.append(f"{have.describe()} is live but not in the farm state")
            elif have is None:
                lines.append(f"{want.describe()} is in the farm state but not live")
            elif (have.purpose, have.thumbprint) != (want.purpose, want.thumbprint):
                lines.append(f"{want.describe()} is {have.describe()} in the config DB")
            elif have.role != want.role:
                lines.append(f"{want.describe()} is {have.role} in the config DB")
            else:
                lines.append(
                    f"{want.describe()} is sealed under master key {have.master_key} in the"
                    f" config DB, not {want.master_key}"
                )
        return lines


def mismatch(state: FarmState, rows: Iterable[LiveRow], *, then: str = "") -> FarmStateError | None:
    """The error for live rows that differ from ``state`` (every difference named), or None.
    ``then``: what the refusal left undone, appended to the sentence."""
    differences = state.differences(rows)
    if not differences:
        return None
    return FarmStateError(
        f"the config DB's certificates differ from its authenticated farm state (version"
        f" {state.version}): {'; '.join(differences)}{then}",
        REPAIR,
    )


def mac_key(master_key: bytes, farm: uuid.UUID) -> bytes:
    """The record's MAC key: HKDF-SHA256 of the master key under the record's own label,
    bound to the farm's DKM group."""
    return _mac.derive_key(master_key, label=MAC_INFO, farm=farm, length=MAC_SIZE)


def seal(state: FarmState, master_key: bytes) -> tuple[bytes, bytes]:
    """The record's bytes and their MAC under ``master_key`` (the key ``state`` names)."""
    body = state.encode()
    return body, hmac.new(mac_key(master_key, state.farm), body, hashlib.sha256).digest()


def digest(body: bytes, mac: bytes) -> str:
    """A short fingerprint of one stored record, which a node keeps to know it has
    already verified these exact bytes."""
    return hashlib.sha256(len(body).to_bytes(8, "big") + body + mac).hexdigest()


def verify(
    body: bytes,
    mac: bytes,
    *,
    farm: uuid.UUID,
    key_for: Callable[[uuid.UUID], bytes],
) -> FarmState:
    """The record, once its bytes parse, name ``farm`` and carry a valid MAC under the
    master key they name; :class:`FarmStateError` otherwise.

    ``key_for(id)`` reads that master key (from the directory); its own errors
    (the key is missing, the directory is down) pass through unchanged.
    """
    state = parse(body)
    if state.farm != farm:
        raise FarmStateError(
            f"the config DB's farm state belongs to the farm with DKM group {state.farm},"
            f" not this farm's {farm}",
            REPAIR,
        )
    key = key_for(state.master_key)
    expected = hmac.new(mac_key(key, farm), body, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, bytes(mac)):
        raise FarmStateError(
            f"the config DB's farm state (version {state.version}) fails authentication"
            f" under master key {state.master_key}",
            REPAIR,
        )
    return state


def parse(body: bytes) -> FarmState:
    """The record in ``body``; :class:`FarmStateError` for anything but canonical bytes of
    a well-formed record. Says nothing of its authenticity: see :func:`verify`."""
    if not isinstance(body, bytes | bytearray | memoryview):
        raise _malformed("it is not bytes")
    return _read.parse(bytes(body), limit=MAX_RECORD, build=_state, encode=FarmState.encode)


def _state(document: object) -> FarmState:
    if not isinstance(document, dict) or document.get("format") not in FORMATS:
        raise _malformed(f"its format is not {FORMAT!r}")
    form = document["format"]
    fields = _read.fields(document, _FIELDS_OF[form], "the record")
    version = _read.integer(fields["version"], "version")
    if version < 1:
        raise _malformed("its version is below 1")
    term = None if fields["term"] is None else _read.integer(fields["term"], "term")
    live = fields["live"]
    if not isinstance(live, list):
        raise _malformed("live is not a list")
    entries = tuple(_entry(item) for item in live)
    if list(entries) != sorted(set(entries)) or len({e.id for e in entries}) != len(entries):
        raise _malformed("live is not sorted by id without repeats")
    revoked = fields["revoked"]
    if not isinstance(revoked, list) or not all(
        isinstance(t, str) and _THUMBPRINT.match(t) for t in revoked
    ):
        raise _malformed("revoked is not a list of thumbprints")
    if revoked != sorted(set(revoked)):
        raise _malformed("revoked is not sorted without repeats")
    shredded: tuple[uuid.UUID, ...] = ()
    answered: tuple[Answered, ...] = ()
    replaced: tuple[Replaced, ...] = ()
    promotions: tuple[Promotion, ...] = ()
    holds: tuple[Hold, ...] = ()
    if form == FORMAT:
        items = fields["promotions"]
        if not isinstance(items, list):
            raise _malformed("promotions is not a list")
        promotions = tuple(_promotion(item) for item in items)
        if [p.purpose for p in promotions] != sorted({p.purpose for p in promotions}):
            raise _malformed("promotions is not sorted by purpose without repeats")
        items = fields["holds"]
        if not isinstance(items, list):
            raise _malformed("holds is not a list")
        holds = tuple(_hold(item) for item in items)
        if [h.purpose for h in holds] != sorted({h.purpose for h in holds}):
            raise _malformed("holds is not sorted by purpose without repeats")
    if form in (FORMAT, FORMAT_2):
        items = fields["replaced"]
        if not isinstance(items, list):
            raise _malformed("replaced is not a list")
        replaced = tuple(_replaced(item) for item in items)
        if [r.key for r in replaced] != sorted({r.key for r in replaced}):
            raise _malformed("replaced is not sorted by key without repeats")
        listed = fields["shredded"]
        if not isinstance(listed, list):
            raise _malformed("shredded is not a list")
        shredded = tuple(_read.uuid(k, "a shredded master key") for k in listed)
        if list(shredded) != sorted(set(shredded)):
            raise _malformed("shredded is not sorted without repeats")
        items = fields["answered"]
        if not isinstance(items, list) or len(items) > MAX_ANSWERED:
            raise _malformed(f"answered is not a list of at most {MAX_ANSWERED}")
        answered = tuple(_answered(item) for item in items)
        if [a.request for a in answered] != sorted({a.request for a in answered}):
            raise _malformed("answered is not sorted by request without repeats")
    return FarmState(
        farm=_read.uuid(fields["farm"], "farm"),
        version=version,
        term=term,
        master_key=_read.uuid(fields["master_key"], "master_key"),
        live=entries,
        revoked=tuple(revoked),
        shredded=shredded,
        answered=answered,
        replaced=replaced,
        promotions=promotions,
        holds=holds,
        format=form,
    )


def _purpose(value: object, what: str) -> str:
    if value not in PURPOSES:
        raise _malformed(f"{what} has an unknown purpose")
    assert isinstance(value, str)
    return value


def _promotion(item: object) -> Promotion:
    fields = _read.fields(item, _PROMOTION_FIELDS, "a promotion")
    if not isinstance(fields["urgent"], bool):
        raise _malformed("a promotion's urgent is not a boolean")
    previous = fields["previous"]
    return Promotion(
        purpose=_purpose(fields["purpose"], "a promotion"),
        at=_read.integer(fields["at"], "a promotion's time"),
        primary=_read.uuid(fields["primary"], "a promotion's primary"),
        previous=None if previous is None else _read.uuid(previous, "a promotion's previous"),
        urgent=fields["urgent"],
    )


def _hold(item: object) -> Hold:
    fields = _read.fields(item, _HOLD_FIELDS, "a hold")
    return Hold(
        purpose=_purpose(fields["purpose"], "a hold"),
        secondary=_read.uuid(fields["secondary"], "a hold's secondary"),
        since=_read.integer(fields["since"], "a hold's time"),
    )


def _replaced(item: object) -> Replaced:
    fields = _read.fields(item, _REPLACED_FIELDS, "a replaced master key")
    if not isinstance(fields["urgent"], bool):
        raise _malformed("a replaced master key's urgent is not a boolean")
    return Replaced(
        key=_read.uuid(fields["key"], "a replaced master key"),
        at=_read.integer(fields["at"], "replaced master key's time"),
        urgent=fields["urgent"],
    )


def _answered(item: object) -> Answered:
    fields = _read.fields(item, _ANSWERED_FIELDS, "an answered request")
    return Answered(
        request=_read.uuid(fields["request"], "an answered request's nonce"),
        expires=_read.integer(fields["expires"], "answered request's expiry"),
    )


def _entry(item: object) -> LiveEntry:
    fields = _read.fields(item, _ENTRY_FIELDS, "a live entry")
    purpose, role, thumbprint = fields["purpose"], fields["role"], fields["thumbprint"]
    if purpose not in PURPOSES or role not in LIVE_ROLES:
        raise _malformed("a live entry has an unknown purpose or role")
    if not isinstance(thumbprint, str) or not _THUMBPRINT.match(thumbprint):
        raise _malformed("a live entry's thumbprint is not 40 upper-case hex digits")
    return LiveEntry(
        id=_read.uuid(fields["id"], "a live entry's id"),
        purpose=purpose,
        role=role,
        thumbprint=thumbprint,
        master_key=_read.uuid(fields["master_key"], "a live entry's master_key"),
    )
