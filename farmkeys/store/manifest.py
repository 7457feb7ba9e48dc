"""The manifest: what one generation of the store holds, as ``manifest.json``.

Written by an install, read by every look at the store. It lists each certificate
with its files and their SHA-256 digests, the farm the store is pinned to, the farm
state record the set was installed under, the thumbprints an urgent rollover
made the store forget, and whether its ``.p12`` files have a password. Parsing
checks every field and says what is wrong in a :class:`~farmkeys.errors.StoreError`,
whatever the bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from farmkeys.errors import StoreError
from farmkeys.store.layout import FILE_SUFFIXES, SYNC_AGAIN, THUMBPRINT, files_of
from farmkeys.vocab import ALIASED_ROLES, LIVE_ROLES, PURPOSES

# A manifest larger than this is corrupt, not read.
MAX_MANIFEST_BYTES = 1 << 20

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# What farmkeys.pkcs12_password.marker writes: numbers (device, inode, times) and colons.
_MARKER = re.compile(r"[0-9:]{1,200}")


@dataclass(frozen=True)
class ManifestEntry:
    """One installed certificate; ``files`` maps cert/key/pkcs12 to paths relative to the store."""

    purpose: str
    role: str
    thumbprint: str
    not_after: datetime
    files: dict[str, str]
    sha256: dict[str, str] | None = None  # kind -> hex digest; None in older manifests


@dataclass(frozen=True)
class Manifest:
    """What one generation of the store holds; written as ``manifest.json``."""

    node: str
    generation: int
    installed_at: datetime
    certificates: tuple[ManifestEntry, ...]
    dkm_group: str | None = None  # the farm this store is pinned to (its DKM group)
    # The farm state record this set was installed under (farmkeys.formats.farm_state): the
    # highest version this node has installed, and the fingerprint of the record's bytes.
    state_version: int | None = None
    state_digest: str | None = None
    # Thumbprints an urgent rollover replaced: never installed here again, and no file of
    # theirs is kept in any generation.
    forgotten: frozenset[str] = frozenset()
    # Whether the .p12 files have a password (node.pkcs12_password_file): None for none
    # (and in manifests from before the option), else the marker of the password file they
    # were encrypted under (farmkeys.pkcs12_password: its inode and times, never a digest
    # of the password), so a sync sees a changed file without reading it.
    pkcs12_password: str | None = None

    @property
    def pkcs12_protection(self) -> str:
        """``"password"`` or ``"none"``: how this generation's .p12 files are protected."""
        return "none" if self.pkcs12_password is None else "password"

    def to_json(self) -> str:
        document: dict[str, Any] = {} if self.dkm_group is None else {"dkm_group": self.dkm_group}
        if self.state_version is not None:
            document |= {"state_version": self.state_version, "state_digest": self.state_digest}
        if self.forgotten:
            document["forgotten"] = sorted(self.forgotten)
        if self.pkcs12_password is not None:
            document["pkcs12_password"] = self.pkcs12_password
        document |= {
            "node": self.node,
            "generation": self.generation,
            "installed_at": self.installed_at.isoformat(),
            "certificates": [
                {
                    "purpose": entry.purpose,
                    "role": entry.role,
                    "thumbprint": entry.thumbprint,
                    "not_after": entry.not_after.isoformat(),
                    "files": dict(entry.files),
                    **({} if entry.sha256 is None else {"sha256": dict(entry.sha256)}),
                }
                for entry in self.certificates
            ],
        }
        return json.dumps(document, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and check a manifest; :class:`StoreError` says what is wrong with it."""
        return cls.from_bytes(text.encode("utf-8", "surrogatepass"))

    @classmethod
    def from_bytes(cls, raw: bytes, *, where: str = "the store manifest") -> Manifest:
        """Parse and check a manifest file's bytes; :class:`StoreError` (and nothing else)
        says what is wrong with them."""
        try:
            if len(raw) > MAX_MANIFEST_BYTES:
                raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
            return _parse_manifest(json.loads(raw.decode("utf-8")))
        except (ValueError, RecursionError) as exc:  # also UnicodeDecodeError, JSONDecodeError
            reason = "nested too deeply" if isinstance(exc, RecursionError) else _reason(exc)
            raise StoreError(f"{where} is malformed: {reason}", SYNC_AGAIN) from None

    def identity(self) -> frozenset[tuple[str, str, str]]:
        """The installed set as ``{(purpose, role, thumbprint)}``."""
        return frozenset((e.purpose, e.role, e.thumbprint) for e in self.certificates)


def digests(contents: Mapping[str, bytes]) -> dict[str, str]:
    """The SHA-256 (hex) of each file's bytes, by kind (cert, key, pkcs12)."""
    return {kind: hashlib.sha256(data).hexdigest() for kind, data in contents.items()}


# -- validation ---------------------------------------------------------------


def check_names(purpose: object, role: object, thumbprint: object) -> None:
    """``ValueError`` unless these name a purpose, a live role and a thumbprint."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}")
    if role not in LIVE_ROLES:
        raise ValueError(f"role must be one of {', '.join(LIVE_ROLES)}, not {role!r}")
    if not isinstance(thumbprint, str) or not THUMBPRINT.fullmatch(thumbprint):
        raise ValueError(f"thumbprint must be 40 upper-case hex digits, not {thumbprint!r}")


def require_aware(value: object, name: str) -> None:
    """``ValueError`` unless ``value`` is a timezone-aware datetime."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime")


def check_set(identities: Iterable[tuple[str, str, str]]) -> None:
    """At most one primary and one secondary per purpose; no certificate twice per purpose."""
    thumbprints: set[tuple[str, str]] = set()
    roles: set[tuple[str, str]] = set()
    for purpose, role, thumbprint in identities:
        if (purpose, thumbprint) in thumbprints:
            raise ValueError(f"{purpose} certificate {thumbprint} is listed twice")
        thumbprints.add((purpose, thumbprint))
        if role in ALIASED_ROLES:
            if (purpose, role) in roles:
                raise ValueError(f"more than one {role} {purpose} certificate")
            roles.add((purpose, role))


# -- parsing ------------------------------------------------------------------


def _parse_manifest(document: object) -> Manifest:
    """The manifest in ``document`` (parsed JSON); ``ValueError`` says what is wrong."""
    top = _object(
        document,
        "the manifest",
        ("node", "generation", "installed_at", "certificates"),
        optional=("dkm_group", "state_version", "state_digest", "forgotten", "pkcs12_password"),
    )
    state_version, state_digest = top.get("state_version"), top.get("state_digest")
    if state_version is not None and (
        type(state_version) is not int
        or not 1 <= state_version < 1 << 63
        or not isinstance(state_digest, str)
        or not _SHA256_HEX.match(state_digest)
    ):
        raise ValueError("state_version must be a positive integer with a SHA-256 state_digest")
    forgotten = top.get("forgotten", [])
    if not isinstance(forgotten, list) or not all(
        isinstance(t, str) and THUMBPRINT.fullmatch(t) for t in forgotten
    ):
        raise ValueError("forgotten must be a list of thumbprints")
    dkm_group = top.get("dkm_group")
    if dkm_group is not None:
        try:
            dkm_group = str(uuid.UUID(dkm_group))
        except (TypeError, ValueError, AttributeError):
            raise ValueError("dkm_group must be a GUID") from None
    pkcs12_password = top.get("pkcs12_password")
    if pkcs12_password is not None and not (
        isinstance(pkcs12_password, str) and _MARKER.fullmatch(pkcs12_password)
    ):
        raise ValueError("pkcs12_password must be the marker of a password file")
    node = top["node"]
    if not isinstance(node, str) or not node:
        raise ValueError("node must be a non-empty string")
    generation = top["generation"]
    if type(generation) is not int or generation < 1:
        raise ValueError("generation must be a positive integer")
    installed_at = _timestamp(top["installed_at"], "installed_at")
    listed = top["certificates"]
    if not isinstance(listed, list):
        raise ValueError("certificates must be a list")
    entries = [_parse_entry(item, f"certificates[{index}]") for index, item in enumerate(listed)]
    check_set((e.purpose, e.role, e.thumbprint) for e in entries)
    return Manifest(
        node=node,
        generation=generation,
        installed_at=installed_at,
        certificates=tuple(entries),
        dkm_group=dkm_group,
        state_version=state_version,
        state_digest=state_digest if state_version is not None else None,
        forgotten=frozenset(forgotten),
        pkcs12_password=pkcs12_password,
    )


def _parse_entry(item: object, where: str) -> ManifestEntry:
    """One entry of the manifest's ``certificates``, found at ``where``."""
    fields = _object(
        item, where, ("purpose", "role", "thumbprint", "not_after", "files"), ("sha256",)
    )
    sha256 = fields.get("sha256")
    if sha256 is not None and (
        not isinstance(sha256, dict)
        or set(sha256) != set(FILE_SUFFIXES)
        or not all(isinstance(v, str) and _SHA256_HEX.match(v) for v in sha256.values())
    ):
        raise ValueError(f"{where}.sha256 must map cert, key and pkcs12 to SHA-256 digests")
    try:
        check_names(fields["purpose"], fields["role"], fields["thumbprint"])
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    purpose, thumbprint = fields["purpose"], fields["thumbprint"]
    files = fields["files"]
    if files != files_of(purpose, thumbprint):
        raise ValueError(f"{where}.files must name {purpose}/{thumbprint}.pem, .key and .p12")
    return ManifestEntry(
        purpose=purpose,
        role=fields["role"],
        thumbprint=thumbprint,
        not_after=_timestamp(fields["not_after"], f"{where}.not_after"),
        files=dict(files),
        sha256=None if sha256 is None else dict(sha256),
    )


def _object(
    value: object, where: str, keys: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be an object")
    if not set(keys) <= set(value) <= set(keys) | set(optional):
        also = f" (and may have {', '.join(optional)})" if optional else ""
        raise ValueError(f"{where} must have exactly the keys {', '.join(keys)}{also}")
    return value


def _timestamp(value: object, where: str) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"{where} must be an ISO 8601 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{where} is not an ISO 8601 timestamp") from None
    if parsed.utcoffset() is None:
        raise ValueError(f"{where} has no time zone")
    return parsed


def _reason(exc: ValueError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8"
    return str(exc)
