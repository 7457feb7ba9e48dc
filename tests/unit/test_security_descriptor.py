"""The security-descriptor codec (farmkeys.directory.security_descriptor)
against Samba's own encoder.

The reference vectors come from Samba's Python bindings (``samba.dcerpc.security``,
installed with the Samba AD DC that the Active Directory tests run), called in
Debian's system Python, so farmkeys' encoder is checked against an independent one.
"""

from __future__ import annotations

import contextlib
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from farmkeys.directory import ad
from farmkeys.directory import security_descriptor as sd

SERVICE = "S-1-5-21-1111111111-2222222222-3333333333-1105"
DOMAIN = "S-1-5-21-1111111111-2222222222-3333333333"
FULL = "CCDCLCSWRPWPDTLOCRSDRCWDWO"  # 0x000F01FF spelled as SDDL rights


def samba_pack(sddl: str) -> bytes:
    """Samba's binary encoding of ``sddl``, from its own Python bindings."""
    script = (
        "import sys\n"
        "from samba.dcerpc import security\n"
        "from samba.ndr import ndr_pack\n"
        "d = security.descriptor.from_sddl(sys.argv[1], security.dom_sid(sys.argv[2]))\n"
        "sys.stdout.write(ndr_pack(d).hex())\n"
    )
    done = subprocess.run(
        ["/usr/bin/python3", "-c", script, sddl, DOMAIN],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"Samba's bindings failed (run `make servers`): {done.stderr}"
    return bytes.fromhex(done.stdout)


def test_farm_container_descriptor_is_byte_for_byte_what_samba_encodes() -> None:
    sddl = f"D:P(A;CI;{FULL};;;DA)(A;CI;{FULL};;;SY)(A;CI;{FULL};;;{SERVICE})"
    assert ad.container_descriptor(SERVICE) == samba_pack(sddl)


def test_decoding_samba_descriptors() -> None:
    found = sd.decode_descriptor(samba_pack(f"D:P(A;CI;{FULL};;;DA)(A;;RPLC;;;AU)"))
    assert found.protected
    assert found.dacl == (
        sd.Ace(0, sd.CONTAINER_INHERIT_ACE, sd.FULL_CONTROL, f"{DOMAIN}-512"),
        sd.Ace(0, 0, sd.DS_READ_PROPERTY | sd.DS_LIST_CONTENTS, "S-1-5-11"),
    )
    unprotected = sd.decode_descriptor(samba_pack("D:(A;;GA;;;WD)"))
    assert not unprotected.protected
    assert sd.readers(unprotected) == {"S-1-1-0"}


def test_object_aces_are_skipped_over_correctly() -> None:
    # An object ACE (type 5) carries one or two GUIDs before its SID.
    sddl = (
        "D:P(OA;;RP;bf967a86-0de6-11d0-a285-00aa003049e2;;AU)"
        "(OA;CI;WP;bf967a86-0de6-11d0-a285-00aa003049e2;bf967aba-0de6-11d0-a285-00aa003049e2;BA)"
        f"(A;;{FULL};;;SY)"
    )
    found = sd.decode_descriptor(samba_pack(sddl))
    assert [a.sid for a in found.dacl or ()] == ["S-1-5-11", "S-1-5-32-544", "S-1-5-18"]
    assert sd.readers(found) == {"S-1-5-11", "S-1-5-18"}


@pytest.mark.parametrize(
    ("sddl", "problem"),
    [
        (f"D:P(A;CI;{FULL};;;DA)(A;CI;{FULL};;;SY)(A;CI;{FULL};;;{SERVICE})", None),
        (f"D:(A;CI;{FULL};;;DA)(A;CI;{FULL};;;{SERVICE})", "not protected"),
        (f"D:P(A;CI;{FULL};;;{SERVICE})(A;;RP;;;AU)", "S-1-5-11 read"),
        (f"D:P(A;CI;{FULL};;;{SERVICE})(A;;GR;;;WD)", "S-1-1-0 read"),
    ],
)
def test_descriptor_problem_names_who_else_can_read(sddl: str, problem: str | None) -> None:
    found = ad.descriptor_problem(samba_pack(sddl), SERVICE)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_a_missing_or_garbled_descriptor_is_a_problem() -> None:
    assert ad.descriptor_problem(None, SERVICE) == "its security descriptor cannot be read"
    garbled = ad.descriptor_problem(b"\x01\x00\x04\x80" + b"\xff" * 16, SERVICE)
    assert garbled is not None and "does not parse" in garbled


@pytest.mark.parametrize(
    "text", ["S-1-5-18", "S-1-5-21-1-2-3-512", "S-1-0-0", "S-1-281474976710655-4294967295"]
)
def test_sids_round_trip(text: str) -> None:
    raw = sd.sid_to_bytes(text)
    assert sd.sid_from_bytes(raw) == (text, len(raw))


@pytest.mark.parametrize(
    "text", ["S-2-5-18", "S-1-5-", "S-1-281474976710656", "S-1-5-4294967296", "5-21", ""]
)
def test_bad_sids_are_refused(text: str) -> None:
    with pytest.raises(sd.DescriptorError):
        sd.sid_to_bytes(text)


def test_domain_of_an_account_sid() -> None:
    assert sd.domain_of(SERVICE) == DOMAIN
    with pytest.raises(sd.DescriptorError):
        sd.domain_of("S-1-5-18")


@given(st.binary(max_size=200))
def test_decoding_garbage_raises_only_descriptor_errors(data: bytes) -> None:
    with contextlib.suppress(sd.DescriptorError):
        sd.decode_descriptor(data)


@given(st.data())
def test_every_truncation_of_a_real_descriptor_is_refused(data: st.DataObject) -> None:
    whole = ad.container_descriptor(SERVICE)
    cut = data.draw(st.integers(min_value=0, max_value=len(whole) - 1))
    with pytest.raises(sd.DescriptorError):
        sd.decode_descriptor(whole[:cut])
