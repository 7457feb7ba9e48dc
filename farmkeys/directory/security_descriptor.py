"""Windows security descriptors, as Active Directory stores them in ``nTSecurityDescriptor``.

Pure: SIDs, access-allowed ACEs, and a self-relative security descriptor
that carries a DACL only (the form AD accepts when the write is made with
the SD_FLAGS control asking for the DACL alone). The layouts follow
[MS-DTYP] 2.4.2 (SID), 2.4.4.1 (ACE header), 2.4.4.2 (ACCESS_ALLOWED_ACE),
2.4.5 (ACL) and 2.4.6 (SECURITY_DESCRIPTOR); every integer is little-endian
except the SID's 48-bit identifier authority, which is big-endian.

This is our own small encoder and decoder rather than a dependency: farmkeys
writes one descriptor (a protected DACL of a few ACCESS_ALLOWED ACEs) and
checks it back, which is about a hundred lines against a library that parses
every ACE type and SDDL; a short codec is easier to review for a key's only
lock. ``tests/test_sd.py`` checks it against descriptors that Samba wrote.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

# SECURITY_DESCRIPTOR control bits ([MS-DTYP] 2.4.6).
SE_DACL_PRESENT = 0x0004
SE_DACL_PROTECTED = 0x1000
SE_SELF_RELATIVE = 0x8000

ACCESS_ALLOWED_ACE_TYPE = 0x00
ACCESS_DENIED_ACE_TYPE = 0x01
ACCESS_ALLOWED_OBJECT_ACE_TYPE = 0x05
CONTAINER_INHERIT_ACE = 0x02
INHERITED_ACE = 0x10

ACL_REVISION = 2
ACL_REVISION_DS = 4

# Directory-service access rights ([MS-ADTS] 5.1.3.2): full control of an object
# and its children, spelled out rather than as GENERIC_ALL so nothing depends on
# the server's generic mapping.
DS_CREATE_CHILD = 0x00000001
DS_DELETE_CHILD = 0x00000002
DS_LIST_CONTENTS = 0x00000004
DS_SELF = 0x00000008
DS_READ_PROPERTY = 0x00000010
DS_WRITE_PROPERTY = 0x00000020
DS_DELETE_TREE = 0x00000040
DS_LIST_OBJECT = 0x00000080
DS_CONTROL_ACCESS = 0x00000100
DELETE = 0x00010000
READ_CONTROL = 0x00020000
WRITE_DAC = 0x00040000
WRITE_OWNER = 0x00080000
FULL_CONTROL = 0x000F01FF
# What lets an account see anything: reading properties, listing children or the object.
READ_RIGHTS = DS_READ_PROPERTY | DS_LIST_CONTENTS | DS_LIST_OBJECT | DS_CONTROL_ACCESS

LOCAL_SYSTEM = "S-1-5-18"
DOMAIN_ADMINS_RID = 512

_SID_TEXT = re.compile(r"^S-1-(\d+)((?:-\d+){0,15})$", re.IGNORECASE)


class DescriptorError(ValueError):
    """A SID or security descriptor that does not follow [MS-DTYP]."""


def sid_to_bytes(sid: str) -> bytes:
    """The binary form of a SID written as ``S-1-5-21-...``."""
    match = _SID_TEXT.match(sid.strip())
    if match is None:
        raise DescriptorError(f"{sid!r} is not a SID (S-1-<authority>-<sub-authorities>)")
    authority = int(match.group(1))
    subs = [int(s) for s in match.group(2).split("-")[1:]]
    if authority >= 1 << 48 or any(s >= 1 << 32 for s in subs):
        raise DescriptorError(f"{sid!r} has a part too large for a SID")
    return (
        struct.pack("<BB", 1, len(subs))
        + authority.to_bytes(6, "big")
        + b"".join(struct.pack("<I", s) for s in subs)
    )


def sid_from_bytes(data: bytes, offset: int = 0) -> tuple[str, int]:
    """The SID at ``offset`` of ``data`` as text, and its length in bytes."""
    if len(data) < offset + 8:
        raise DescriptorError("a SID is cut short")
    revision, count = data[offset], data[offset + 1]
    if revision != 1 or count > 15:
        raise DescriptorError(f"a SID has revision {revision} and {count} sub-authorities")
    size = 8 + 4 * count
    if len(data) < offset + size:
        raise DescriptorError("a SID is cut short")
    authority = int.from_bytes(data[offset + 2 : offset + 8], "big")
    subs = struct.unpack_from(f"<{count}I", data, offset + 8)
    return "S-1-" + "-".join(str(p) for p in (authority, *subs)), size


def domain_of(sid: str) -> str:
    """The domain SID of an account SID (``S-1-5-21-a-b-c-RID`` → ``S-1-5-21-a-b-c``)."""
    parts = sid.split("-")
    if len(parts) != 8 or parts[:4] != ["S", "1", "5", "21"]:
        raise DescriptorError(f"{sid} is not a domain account's SID (S-1-5-21-a-b-c-RID)")
    return "-".join(parts[:-1])


@dataclass(frozen=True)
class Ace:
    """One ACE: its type, flags, access mask and trustee SID (object ACEs keep no GUIDs)."""

    type: int
    flags: int
    mask: int
    sid: str

    def encode(self) -> bytes:
        if self.type not in (ACCESS_ALLOWED_ACE_TYPE, ACCESS_DENIED_ACE_TYPE):
            raise DescriptorError(f"cannot encode ACE type {self.type}")
        body = struct.pack("<I", self.mask) + sid_to_bytes(self.sid)
        return struct.pack("<BBH", self.type, self.flags, 4 + len(body)) + body


def allow(sid: str, mask: int = FULL_CONTROL, *, inherit: bool = True) -> Ace:
    """An access-allowed ACE for ``sid``, inherited by the children when ``inherit``."""
    return Ace(ACCESS_ALLOWED_ACE_TYPE, CONTAINER_INHERIT_ACE if inherit else 0, mask, sid)


@dataclass(frozen=True)
class Descriptor:
    """What farmkeys reads back of a descriptor: its control bits and its DACL."""

    control: int
    dacl: tuple[Ace, ...] | None

    @property
    def protected(self) -> bool:
        """Whether the DACL ignores the parent's inheritable ACEs."""
        return bool(self.control & SE_DACL_PROTECTED)


def encode_dacl_descriptor(aces: tuple[Ace, ...] | list[Ace], *, protected: bool) -> bytes:
    """A self-relative security descriptor with no owner, group or SACL, and this DACL."""
    body = b"".join(ace.encode() for ace in aces)
    acl = struct.pack("<BBHHH", ACL_REVISION_DS, 0, 8 + len(body), len(aces), 0) + body
    control = SE_SELF_RELATIVE | SE_DACL_PRESENT | (SE_DACL_PROTECTED if protected else 0)
    # Revision, Sbz1, Control, OffsetOwner, OffsetGroup, OffsetSacl, OffsetDacl.
    return struct.pack("<BBHIIII", 1, 0, control, 0, 0, 0, 20) + acl


def decode_descriptor(data: bytes) -> Descriptor:
    """The control bits and DACL of a self-relative security descriptor."""
    if len(data) < 20:
        raise DescriptorError("a security descriptor is shorter than its 20-byte header")
    revision, _, control, _, _, _, dacl_offset = struct.unpack_from("<BBHIIII", data)
    if revision != 1 or not control & SE_SELF_RELATIVE:
        raise DescriptorError("not a self-relative security descriptor of revision 1")
    if not control & SE_DACL_PRESENT or dacl_offset == 0:
        return Descriptor(control, None)
    if len(data) < dacl_offset + 8:
        raise DescriptorError("the DACL is cut short")
    _, _, size, count, _ = struct.unpack_from("<BBHHH", data, dacl_offset)
    end = dacl_offset + size
    if len(data) < end:
        raise DescriptorError("the DACL is longer than the descriptor")
    aces: list[Ace] = []
    at = dacl_offset + 8
    for _ in range(count):
        if at + 8 > end:
            raise DescriptorError("an ACE is cut short")
        kind, flags, ace_size = struct.unpack_from("<BBH", data, at)
        if ace_size < 8 or at + ace_size > end:
            raise DescriptorError("an ACE's size is out of bounds")
        (mask,) = struct.unpack_from("<I", data, at + 4)
        sid_at = at + 8
        if kind in (ACCESS_ALLOWED_OBJECT_ACE_TYPE, 0x06):  # object ACEs: skip the GUIDs
            if ace_size < 12:
                raise DescriptorError("an object ACE is cut short")
            (object_flags,) = struct.unpack_from("<I", data, at + 8)
            sid_at = at + 12 + 16 * bin(object_flags & 0x3).count("1")
        sid, _ = sid_from_bytes(data[: at + ace_size], sid_at)
        aces.append(Ace(kind, flags, mask, sid))
        at += ace_size
    return Descriptor(control, tuple(aces))


def readers(descriptor: Descriptor) -> set[str]:
    """The SIDs that an access-allowed ACE of ``descriptor`` lets read or list anything."""
    if descriptor.dacl is None:
        return {"S-1-1-0"}  # no DACL: everyone has every right
    return {
        ace.sid
        for ace in descriptor.dacl
        if ace.type in (ACCESS_ALLOWED_ACE_TYPE, ACCESS_ALLOWED_OBJECT_ACE_TYPE)
        and ace.mask & (READ_RIGHTS | 0x80000000 | 0x10000000)  # GENERIC_READ, GENERIC_ALL
    }
