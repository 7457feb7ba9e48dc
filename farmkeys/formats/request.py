"""Operator requests, authenticated: what `rollover`, `repair-state` and `import adfs` ask.

The config DB is attacker-writable, so a row of ``rollover_request`` is only a
letter box. The command that files a request can read the directory (a config
DB writer cannot), so it signs what it asks: the canonical bytes of a
:class:`Request` (sorted-key ASCII JSON, like the farm state record) and an
HMAC-SHA256 over them under a key derived from a master key of the farm with
HKDF-SHA256, its own label (:data:`MAC_INFO`) and the farm's DKM group, so it
can be mistaken neither for a blob key nor for the farm state's MAC key, nor
carried to another farm.

The body covers every field the leader acts on: the row's id, a random nonce,
the kind, the purpose, urgency, the requesting node, the creation time and expiry
(by the config DB's clock, which the leader also judges by), who asked (format 2,
:class:`Requester`: the account and host the command ran as and on, and the
operator's ``--reason``), and per kind:

- ``repair_state``: the digest of exactly the live rows the operator reviewed
  (:func:`rows_digest`), the revoked thumbprints the operator keeps, whether
  the operator named them, and the lowest version the new record may take;
- ``import``: the certificate id its row gets, its role, its source, and the
  SHA-256 of the sealed blob in the row;
- ``revert`` (`rollover --revert`): nothing more than its purpose (``signing`` or
  ``decryption``, never ``all``) and ``urgent`` false; what it undoes is the leader's
  to read from the authenticated farm state record, never the request's to name.

The leader (:mod:`farmkeys.leader`) acts on the body alone, after
:func:`verify`, and refuses a row whose columns say anything else, whose nonce
the authentic farm state lists as answered, or whose time has passed. Pure:
no I/O.

Format 1 (farmkeys before issue 22) had no requester. A leader still reads it, so
that a command of an older farmkeys works during a rolling upgrade, and records its
requester as not recorded (:attr:`Request.requester` None), never as anyone's; a
leader of that older farmkeys refuses a format-2 body as malformed, and does nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import unicodedata
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from farmkeys.errors import RequestRefusedError
from farmkeys.formats import _canonical, _mac
from farmkeys.vocab import PURPOSES, REQUEST_PURPOSES

FORMAT = "farmkeys-request/2"
FORMAT_1 = "farmkeys-request/1"  # before the requester (issue 22): still read
MAC_INFO = b"farmkeys operator request MAC v1\x00"
MAC_SIZE = 32
MAX_BODY = 64 * 1024  # a request is a few hundred bytes; a repair lists some thumbprints
MAX_LIFETIME_SECONDS = 24 * 3600
"""The longest a request stays valid after it was made, whatever its ``--wait``."""
CLOCK_ALLOWANCE_SECONDS = 5 * 60
"""How far in the future a request's creation time may be (the config DB's clock, read by
the command, then by the leader: a database failover can move it)."""

MAX_ACCOUNT = 200
"""The longest account a request names, in characters ("alice via sudo as root")."""
MAX_HOST = 255
"""The longest host name a request names, in characters (a DNS name's limit)."""
MAX_REASON = 200
"""The longest ``--reason``, in characters: a sentence or a ticket number."""

KINDS = ("rollover", "master_key", "repair_state", "import", "revert")
IMPORT_ROLES = ("primary", "secondary")
REVERT_PURPOSES = PURPOSES  # one purpose: a revert undoes one promotion
_FIELDS_1 = {
    "created",
    "expires",
    "farm",
    "format",
    "id",
    "import",
    "kind",
    "master_key",
    "nonce",
    "purpose",
    "repair",
    "requested_by",
    "urgent",
}
_FIELDS = _FIELDS_1 | {"account", "host", "reason"}
_REPAIR_FIELDS = {"min_version", "revoked", "revoked_named", "rows"}
_IMPORT_FIELDS = {"blob_sha256", "certificate", "role", "source"}


def _malformed(why: str) -> RequestRefusedError:
    return RequestRefusedError(
        f"the request is malformed: {why}",
        "file requests with `farmkeys rollover`, `repair-state` or `import adfs` only",
    )


_read = _canonical.Reader(_malformed, integers="a non-negative 64-bit integer")
"""The canonical JSON reader of requests, whose refusals say the request is malformed."""


def text_problem(text: str, *, limit: int) -> str | None:
    """What makes ``text`` unfit for a request's account, host or reason (None: fit): it
    must be one line of at most ``limit`` printable characters, not empty.

    Printable as Python's :meth:`str.isprintable` says: no control character (newline,
    ESC, DEL, C1), no line or paragraph separator, no format character (the bidi
    overrides and isolates), and no space but U+0020.
    """
    if not text:
        return "it is empty"
    if len(text) > limit:
        return f"it is {len(text)} characters long, more than {limit}"
    bad = next((c for c in text if not c.isprintable()), None)
    if bad is not None:
        kind = "control" if unicodedata.category(bad) in ("Cc", "Cf") else "non-printing"
        return f"it holds the {kind} character U+{ord(bad):04X}"
    return None


@dataclass(frozen=True)
class Requester:
    """Who asked (format 2): what the command that signed the request says of itself.

    ``account``: the account the command ran as, by its effective user id
    (``"farmkeys"``), or ``"alice via sudo as root"`` when sudo ran it for another
    user (its ``SUDO_USER``). ``host``: the host name it ran on (``gethostname()``).
    ``reason``: the operator's ``--reason``, or None. Each is one line of printable
    text within its limit (:func:`text_problem`). The MAC proves that a holder of the
    farm's master key wrote them, not that they are true: see docs/security.md.
    """

    account: str
    host: str
    reason: str | None = None

    def problem(self) -> str | None:
        """Why this requester cannot be signed or read (None: it can)."""
        for name, value, limit in (
            ("account", self.account, MAX_ACCOUNT),
            ("host", self.host, MAX_HOST),
            ("reason", self.reason, MAX_REASON),
        ):
            if value is None and name == "reason":
                continue
            why = text_problem(value, limit=limit) if isinstance(value, str) else "not text"
            if why is not None:
                return f"its {name} is unfit: {why}"
        return None


@dataclass(frozen=True)
class RepairTerms:
    """What `repair-state` vouches for."""

    rows: str  # rows_digest() of the live rows the operator reviewed
    revoked: tuple[str, ...]  # sorted: every thumbprint the new record keeps revoked
    revoked_named: bool  # the operator named them (--revoked FILE)
    min_version: int  # the new record's version is at least this


@dataclass(frozen=True)
class ImportTerms:
    """What `import adfs` hands over (the sealed blob stays in its column)."""

    certificate: uuid.UUID
    role: str
    source: str
    blob_sha256: str


@dataclass(frozen=True)
class Request:
    """One operator request as its maker signed it."""

    id: int
    nonce: uuid.UUID
    farm: uuid.UUID
    kind: str
    purpose: str | None  # None for a master-key roll
    urgent: bool
    requested_by: str
    created: int  # seconds since the epoch, the config DB's clock
    expires: int
    master_key: uuid.UUID  # the key the MAC is under
    repair: RepairTerms | None = None
    import_: ImportTerms | None = None
    requester: Requester | None = None  # None only for a format-1 body: who asked is unknown

    @property
    def format(self) -> str:
        return FORMAT_1 if self.requester is None else FORMAT

    def encode(self) -> bytes:
        """The canonical bytes the MAC covers (format 1 for a request without requester)."""
        document: dict[str, Any] = {
            "created": self.created,
            "expires": self.expires,
            "farm": str(self.farm),
            "format": self.format,
            "id": self.id,
            "import": None,
            "kind": self.kind,
            "master_key": str(self.master_key),
            "nonce": str(self.nonce),
            "purpose": self.purpose,
            "repair": None,
            "requested_by": self.requested_by,
            "urgent": self.urgent,
        }
        if self.requester is not None:
            document["account"] = self.requester.account
            document["host"] = self.requester.host
            document["reason"] = self.requester.reason
        if self.repair is not None:
            document["repair"] = {
                "min_version": self.repair.min_version,
                "revoked": list(self.repair.revoked),
                "revoked_named": self.repair.revoked_named,
                "rows": self.repair.rows,
            }
        if self.import_ is not None:
            document["import"] = {
                "blob_sha256": self.import_.blob_sha256,
                "certificate": str(self.import_.certificate),
                "role": self.import_.role,
                "source": self.import_.source,
            }
        return _canonical.encode(document)

    def describe(self) -> str:
        if self.kind == "rollover":
            return f"rollover of {self.purpose}" + (" (urgent)" if self.urgent else "")
        if self.kind == "master_key":
            return "master-key roll" + (" (urgent)" if self.urgent else "")
        if self.kind == "import":
            return f"import of a {self.purpose} certificate"
        if self.kind == "revert":
            return f"revert of the last {self.purpose} promotion"
        return "repair-state"


def mac_key(master_key: bytes, farm: uuid.UUID) -> bytes:
    """The request MAC key: HKDF-SHA256 of a master key under the requests' own label,
    bound to the farm's DKM group."""
    return _mac.derive_key(master_key, label=MAC_INFO, farm=farm, length=MAC_SIZE)


def sign(request: Request, master_key: bytes) -> tuple[bytes, bytes]:
    """The request's bytes and their MAC under ``master_key`` (the key it names).

    A request without its requester, or with one that cannot be read back, is a
    programming error (:class:`ValueError`): the command checks what it signs.
    """
    if request.requester is None:
        raise ValueError("a request is signed with its requester (format 2)")
    why = request.requester.problem()
    if why is not None:
        raise ValueError(f"the request's requester cannot be signed: {why}")
    body = request.encode()
    return body, hmac.new(mac_key(master_key, request.farm), body, hashlib.sha256).digest()


def rows_digest(entries: Iterable[Any]) -> str:
    """SHA-256 over the live entries (:class:`farmkeys.formats.farm_state.LiveEntry`: id, purpose,
    role, thumbprint, master key) in id order: what `repair-state` showed the operator."""
    h = hashlib.sha256(b"farmkeys repair rows v1\x00")
    for e in sorted(entries):
        h.update(f"{e.id} {e.purpose} {e.role} {e.thumbprint} {e.master_key}\n".encode("ascii"))
    return h.hexdigest()


def blob_digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def verify(
    body: bytes | None,
    mac: bytes | None,
    *,
    farm: uuid.UUID,
    row_id: int,
    key_for: Callable[[uuid.UUID], bytes],
) -> Request:
    """The request in ``body``, once it parses, is this farm's and this row's, and carries
    a valid MAC under the master key it names; :class:`RequestRefusedError` otherwise.

    ``key_for(id)`` reads that master key; a key the farm no longer has (it was deleted
    by an urgent master-key roll) refuses the request, which its maker then re-issues.
    """
    if body is None or mac is None:
        raise RequestRefusedError(
            f"request {row_id} carries no MAC (it was not made by farmkeys' request commands)",
            "file requests with `farmkeys rollover`, `repair-state` or `import adfs` only",
        )
    request = parse(bytes(body))
    if request.farm != farm or request.id != row_id:
        raise _forged(row_id, "it was made for another farm or another request row")
    from farmkeys.errors import DirectoryError

    try:
        key = key_for(request.master_key)
    except DirectoryError as exc:
        raise RequestRefusedError(
            f"request {row_id} is signed under master key {request.master_key}, which cannot"
            f" be read: {exc.what}",
            "re-issue the request (it is signed under the current master key then)",
        ) from None
    expected = hmac.new(mac_key(key, farm), bytes(body), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, bytes(mac)):
        raise _forged(row_id, "its MAC does not verify")
    return request


class RequestColumns(Protocol):
    """What :func:`columns_differ` reads of a ``rollover_request`` row
    (:class:`farmkeys.db.RequestRow` has it)."""

    @property
    def requested_by(self) -> str: ...
    @property
    def purpose(self) -> str | None: ...
    @property
    def urgent(self) -> bool: ...
    @property
    def master_key(self) -> bool: ...
    @property
    def repair_state(self) -> bool: ...
    @property
    def revert(self) -> bool: ...
    @property
    def import_certificate(self) -> uuid.UUID | None: ...
    @property
    def import_blob(self) -> bytes | None: ...
    @property
    def import_role(self) -> str | None: ...
    @property
    def import_source(self) -> str | None: ...
    @property
    def account(self) -> str | None: ...
    @property
    def host(self) -> str | None: ...
    @property
    def reason(self) -> str | None: ...


def columns_differ(request: Request, row: RequestColumns) -> bool:
    """Whether a ``rollover_request`` row's columns say anything else than its signed body
    (a DB writer flipped the kind, a revert among them, the purpose or urgency, swapped the
    import's blob, or changed who asked or why; a format-1 body's row names no account,
    host or reason)."""
    kind = (
        "revert"
        if row.revert
        else "master_key"
        if row.master_key
        else "repair_state"
        if row.repair_state
        else "import"
        if row.import_blob is not None
        else "rollover"
    )
    if (kind, row.purpose, bool(row.urgent)) != (
        request.kind,
        request.purpose,
        request.urgent,
    ) or row.requested_by != request.requested_by:
        return True
    who = request.requester
    claimed = (row.account, row.host, row.reason)
    if claimed != ((None, None, None) if who is None else (who.account, who.host, who.reason)):
        return True
    terms = request.import_
    if terms is None:
        return row.import_blob is not None or row.import_certificate is not None
    return (
        row.import_blob is None
        or row.import_certificate != terms.certificate
        or row.import_role != terms.role
        or row.import_source != terms.source
        or blob_digest(bytes(row.import_blob)) != terms.blob_sha256
    )


def check_fresh(request: Request, *, now: int) -> None:
    """Refuse a request that expired, or that claims to be made in the future."""
    if now > request.expires:
        raise RequestRefusedError(
            f"request {request.id} ({request.describe()}) expired at {request.expires} (now {now})",
            "re-issue the request",
        )
    if request.created > now + CLOCK_ALLOWANCE_SECONDS:
        raise RequestRefusedError(
            f"request {request.id} claims to be made in the future", "re-issue the request"
        )


def parse(body: bytes) -> Request:
    """The request in ``body``; :class:`RequestRefusedError` for anything but canonical
    bytes of a well-formed request. Says nothing of its authenticity: see :func:`verify`."""
    return _read.parse(body, limit=MAX_BODY, build=_request, encode=Request.encode)


def _request(document: object) -> Request:
    if not isinstance(document, dict) or document.get("format") not in (FORMAT, FORMAT_1):
        raise _malformed(f"its format is not {FORMAT!r}")
    form = document["format"]
    fields = _read.fields(document, _FIELDS if form == FORMAT else _FIELDS_1, "the request")
    kind, purpose = fields["kind"], fields["purpose"]
    if kind not in KINDS:
        raise _malformed("its kind is unknown")
    if (purpose is None) != (kind == "master_key") or (
        purpose is not None and purpose not in REQUEST_PURPOSES
    ):
        raise _malformed("its purpose does not fit its kind")
    if not isinstance(fields["urgent"], bool) or not isinstance(fields["requested_by"], str):
        raise _malformed("urgent or requested_by has the wrong type")
    if kind == "revert" and (purpose not in REVERT_PURPOSES or fields["urgent"]):
        raise _malformed("a revert names one purpose and is never urgent")
    repair = None
    if (fields["repair"] is None) != (kind != "repair_state"):
        raise _malformed("repair terms do not fit its kind")
    if fields["repair"] is not None:
        terms = _read.fields(fields["repair"], _REPAIR_FIELDS, "the repair terms")
        revoked = terms["revoked"]
        if not isinstance(revoked, list) or not all(isinstance(t, str) for t in revoked):
            raise _malformed("the revoked list is not a list of thumbprints")
        if revoked != sorted(set(revoked)) or not isinstance(terms["revoked_named"], bool):
            raise _malformed("the revoked list is not sorted without repeats")
        if not isinstance(terms["rows"], str):
            raise _malformed("the rows digest is not a string")
        repair = RepairTerms(
            rows=terms["rows"],
            revoked=tuple(revoked),
            revoked_named=terms["revoked_named"],
            min_version=_read.integer(terms["min_version"], "min_version"),
        )
    import_ = None
    if (fields["import"] is None) != (kind != "import"):
        raise _malformed("import terms do not fit its kind")
    if fields["import"] is not None:
        terms = _read.fields(fields["import"], _IMPORT_FIELDS, "the import terms")
        if terms["role"] not in IMPORT_ROLES or purpose == "all":
            raise _malformed("the import's role or purpose is unknown")
        if not isinstance(terms["source"], str) or not isinstance(terms["blob_sha256"], str):
            raise _malformed("the import's source or digest is not a string")
        import_ = ImportTerms(
            certificate=_read.uuid(terms["certificate"], "the import's certificate"),
            role=terms["role"],
            source=terms["source"],
            blob_sha256=terms["blob_sha256"],
        )
    requester = None
    if form == FORMAT:
        requester = Requester(fields["account"], fields["host"], fields["reason"])
        why = requester.problem()
        if why is not None:
            raise _malformed(why)
    return Request(
        id=_read.integer(fields["id"], "id"),
        nonce=_read.uuid(fields["nonce"], "nonce"),
        farm=_read.uuid(fields["farm"], "farm"),
        kind=kind,
        purpose=purpose,
        urgent=fields["urgent"],
        requested_by=fields["requested_by"],
        created=_read.integer(fields["created"], "created"),
        expires=_read.integer(fields["expires"], "expires"),
        master_key=_read.uuid(fields["master_key"], "master_key"),
        repair=repair,
        import_=import_,
        requester=requester,
    )


def _forged(row_id: int, why: str) -> RequestRefusedError:
    return RequestRefusedError(
        f"request {row_id} is not authentic: {why}",
        "someone who can write the config DB filed or changed it; nothing was done."
        " Find out who, and re-issue the request if it was yours",
    )
