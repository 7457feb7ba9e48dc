"""The farm state record (farmkeys.formats.farm_state): its bytes, its MAC, and what it refuses."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import uuid
from dataclasses import dataclass, replace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from farmkeys.errors import Error, FarmStateError
from farmkeys.formats import blob, farm_state

FARM = uuid.UUID("6f1c5a0e-2b1d-4c53-9a3e-0d7f3b2a9c11")
KEY_ID = uuid.UUID("0b5a9c1e-8d2f-4e6a-b1c3-5d7e9f0a2b4c")
KEY = bytes(range(32))


@dataclass(frozen=True)
class Row:
    id: uuid.UUID
    purpose: str
    role: str
    thumbprint: str
    master_key: uuid.UUID


def rows() -> list[Row]:
    return [
        Row(uuid.UUID(int=3), "signing", "primary", "A" * 40, KEY_ID),
        Row(uuid.UUID(int=1), "decryption", "primary", "B" * 40, KEY_ID),
        Row(uuid.UUID(int=2), "signing", "secondary", "C" * 40, KEY_ID),
    ]


def state(version: int = 7, **changes: object) -> farm_state.FarmState:
    built = farm_state.FarmState.build(
        farm=FARM, version=version, term=4, master_key=KEY_ID, rows=rows(), revoked=["D" * 40]
    )
    return replace(built, **changes)  # type: ignore[arg-type]


def keys(key_id: uuid.UUID) -> bytes:
    if key_id == KEY_ID:
        return KEY
    raise FarmStateError(f"no key {key_id}", "test")


def test_a_sealed_record_verifies_and_reads_back_what_was_written() -> None:
    body, mac = farm_state.seal(state(), KEY)
    got = farm_state.verify(body, mac, farm=FARM, key_for=keys)
    assert got == state()
    assert [e.id for e in got.live] == [uuid.UUID(int=n) for n in (1, 2, 3)]  # sorted by id
    assert got.differences(rows()) == []


def test_the_bytes_are_canonical_json_with_the_documented_fields() -> None:
    body = state().encode()
    document = json.loads(body)
    assert sorted(document) == [
        "answered",
        "farm",
        "format",
        "live",
        "master_key",
        "replaced",
        "revoked",
        "shredded",
        "term",
        "version",
    ]
    assert document["format"] == "farmkeys-state/2"
    assert document["live"][0] == {
        "id": str(uuid.UUID(int=1)),
        "master_key": str(KEY_ID),
        "purpose": "decryption",
        "role": "primary",
        "thumbprint": "B" * 40,
    }
    assert body == json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def test_the_mac_is_hmac_sha256_under_an_hkdf_key_of_its_own_label() -> None:
    body, mac = farm_state.seal(state(), KEY)
    derived = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"farmkeys farm state MAC v1\x00" + FARM.bytes,
    ).derive(KEY)
    assert mac == hmac.new(derived, body, hashlib.sha256).digest()
    # Not the key that seals blobs under the same master key.
    blob_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=blob.HKDF_INFO).derive(
        KEY
    )
    assert derived != blob_key


@pytest.mark.parametrize("position", [0, 10, 100, -2])
def test_any_changed_byte_fails(position: int) -> None:
    body, mac = farm_state.seal(state(), KEY)
    changed = bytearray(body)
    changed[position] ^= 0x01
    with pytest.raises(FarmStateError):
        farm_state.verify(bytes(changed), mac, farm=FARM, key_for=keys)
    bad_mac = bytes([mac[0] ^ 1]) + mac[1:]
    with pytest.raises(FarmStateError, match="fails authentication"):
        farm_state.verify(body, bad_mac, farm=FARM, key_for=keys)


def test_a_role_changed_by_a_config_db_writer_fails_authentication() -> None:
    body, mac = farm_state.seal(state(), KEY)
    forged = body.replace(b'"role":"secondary"', b'"role":"primary"')
    assert forged != body
    with pytest.raises(FarmStateError, match="fails authentication"):
        farm_state.verify(forged, mac, farm=FARM, key_for=keys)


def test_a_record_made_under_another_key_fails() -> None:
    body, mac = farm_state.seal(state(), os.urandom(32))
    with pytest.raises(FarmStateError, match="fails authentication"):
        farm_state.verify(body, mac, farm=FARM, key_for=keys)


def test_another_farms_record_is_refused_even_under_the_same_key() -> None:
    other = uuid.uuid4()
    body, mac = farm_state.seal(state(farm=other), KEY)
    with pytest.raises(FarmStateError, match=f"DKM group {other}"):
        farm_state.verify(body, mac, farm=FARM, key_for=keys)


def test_the_key_lookup_error_passes_through() -> None:
    body, mac = farm_state.seal(state(master_key=uuid.UUID(int=9)), KEY)
    with pytest.raises(FarmStateError, match="no key"):
        farm_state.verify(body, mac, farm=FARM, key_for=keys)


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda d: d.update(version=0), "version is below 1"),
        (lambda d: d.update(version=True), "version"),
        (lambda d: d.update(version=1.5), "version"),
        (lambda d: d.update(format="farmkeys-state/4"), "format"),
        (lambda d: d.pop("revoked"), "exactly the fields"),
        (lambda d: d.update(extra=1), "exactly the fields"),
        (lambda d: d.update(farm="not-a-uuid"), "farm is not a UUID"),
        (lambda d: d.update(farm=str(FARM).upper()), "canonical form"),
        (lambda d: d["live"][0].update(role="archived"), "unknown purpose or role"),
        (lambda d: d["live"][0].update(thumbprint="b" * 40), "thumbprint"),
        (lambda d: d["live"].reverse(), "sorted"),
        (lambda d: d["live"].append(d["live"][0]), "sorted"),
        (lambda d: d.update(revoked=["E" * 40, "D" * 40]), "revoked is not sorted"),
        (lambda d: d.update(revoked="D" * 40), "revoked is not a list"),
        (lambda d: d.update(live={}), "live is not a list"),
    ],
)
def test_malformed_records_are_refused_with_why(edit: object, why: str) -> None:
    document = json.loads(state().encode())
    edit(document)  # type: ignore[operator]
    body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(FarmStateError, match=why):
        farm_state.parse(body)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b"null",
        b'{"a":1}',
        b"[" * 100_000,
        b" " + state().encode(),  # not canonical
        state().encode().replace(b":", b": "),
        b"x" * (farm_state.MAX_RECORD + 1),
    ],
)
def test_garbage_ends_in_the_projects_own_error(body: bytes) -> None:
    with pytest.raises(FarmStateError) as caught:
        farm_state.parse(body)
    assert isinstance(caught.value, Error)
    assert "malformed" in caught.value.what


def test_differences_name_each_certificate_that_moved() -> None:
    recorded = state()
    now = rows()
    now[2] = replace(now[2], role="primary")  # the secondary made primary
    now.append(Row(uuid.UUID(int=5), "signing", "retired", "E" * 40, KEY_ID))
    now.pop(1)  # the decryption primary gone
    lines = recorded.differences(now)
    assert "signing secondary " + "C" * 40 + " is primary in the config DB" in lines
    assert "signing retired " + "E" * 40 + " is live but not in the farm state" in lines
    assert "decryption primary " + "B" * 40 + " is in the farm state but not live" in lines
    assert len(lines) == 3


def test_a_row_sealed_under_another_master_key_is_a_difference() -> None:
    now = rows()
    now[0] = replace(now[0], master_key=uuid.UUID(int=8))
    (line,) = state().differences(now)
    assert line.startswith("signing primary " + "A" * 40 + " is sealed under master key")


def test_the_digest_tells_stored_records_apart() -> None:
    body, mac = farm_state.seal(state(), KEY)
    assert farm_state.digest(body, mac) == farm_state.digest(body, mac)
    assert farm_state.digest(body, mac) != farm_state.digest(body, bytes(32))
    assert farm_state.digest(body, mac) != farm_state.digest(body + b" ", mac)


def test_a_format_1_record_still_verifies_and_reads_back_without_tombstones() -> None:
    old = replace(state(), format=farm_state.FORMAT_1)
    body, mac = farm_state.seal(old, KEY)
    document = json.loads(body)
    assert document["format"] == "farmkeys-state/1"
    assert "shredded" not in document and "answered" not in document
    got = farm_state.verify(body, mac, farm=FARM, key_for=keys)
    assert got == old
    assert got.shredded == () and got.answered == ()


def test_tombstones_and_answered_requests_are_covered_by_the_mac() -> None:
    shredded = uuid.UUID(int=99)
    answered = farm_state.Answered(uuid.UUID(int=98), 1_700_000_000)
    record = farm_state.FarmState.build(
        farm=FARM,
        version=3,
        term=1,
        master_key=KEY_ID,
        rows=rows(),
        shredded=[shredded],
        answered=[answered],
    )
    body, mac = farm_state.seal(record, KEY)
    got = farm_state.verify(body, mac, farm=FARM, key_for=keys)
    assert got.shredded == (shredded,)
    assert got.has_answered(answered.request)
    forged = body.replace(str(shredded).encode(), str(uuid.UUID(int=97)).encode())
    with pytest.raises(FarmStateError, match="fails authentication"):
        farm_state.verify(forged, mac, farm=FARM, key_for=keys)
    unlisted = body.replace(b'"shredded":["' + str(shredded).encode() + b'"]', b'"shredded":[]')
    assert unlisted != body
    with pytest.raises(FarmStateError, match="fails authentication"):
        farm_state.verify(unlisted, mac, farm=FARM, key_for=keys)


PROMOTION = farm_state.Promotion(
    "signing", 1_700_000_000, uuid.UUID(int=3), uuid.UUID(int=9), False
)
HOLD = farm_state.Hold("signing", uuid.UUID(int=2), 1_700_000_500)


def test_a_record_with_a_promotion_or_a_hold_is_format_3_and_without_stays_format_2() -> None:
    assert state().format == "farmkeys-state/2"
    assert "promotions" not in json.loads(state().encode())
    record = farm_state.FarmState.build(
        farm=FARM,
        version=3,
        term=1,
        master_key=KEY_ID,
        rows=rows(),
        promotions=[PROMOTION],
        holds=[HOLD],
    )
    document = json.loads(record.encode())
    assert document["format"] == "farmkeys-state/3"
    assert document["promotions"] == [
        {
            "at": 1_700_000_000,
            "previous": str(uuid.UUID(int=9)),
            "primary": str(uuid.UUID(int=3)),
            "purpose": "signing",
            "urgent": False,
        }
    ]
    assert document["holds"] == [
        {"purpose": "signing", "secondary": str(uuid.UUID(int=2)), "since": 1_700_000_500}
    ]
    body, mac = farm_state.seal(record, KEY)
    got = farm_state.verify(body, mac, farm=FARM, key_for=keys)
    assert got == record
    assert got.promotion("signing") == PROMOTION and got.promotion("decryption") is None
    assert got.held_secondaries() == {uuid.UUID(int=2)}


def test_promotions_and_holds_are_kept_only_while_they_name_the_live_primary_and_secondary() -> (
    None
):
    # The promotion names a primary that is not the signing primary; the hold a secondary
    # that is not the signing secondary: both dropped, and the record is format 2 again.
    stale = farm_state.FarmState.build(
        farm=FARM,
        version=3,
        term=1,
        master_key=KEY_ID,
        rows=rows(),
        promotions=[replace(PROMOTION, primary=uuid.UUID(int=2))],
        holds=[replace(HOLD, secondary=uuid.UUID(int=3))],
    )
    assert stale.promotions == () and stale.holds == ()
    assert stale.format == "farmkeys-state/2"


def test_a_hold_forged_in_or_out_of_the_record_fails_authentication() -> None:
    held = farm_state.FarmState.build(
        farm=FARM, version=3, term=1, master_key=KEY_ID, rows=rows(), holds=[HOLD]
    )
    body, mac = farm_state.seal(held, KEY)
    released = body.replace(
        b'"holds":[{"purpose":"signing","secondary":"'
        + str(HOLD.secondary).encode()
        + b'","since":1700000500}]',
        b'"holds":[]',
    )
    assert released != body
    with pytest.raises(FarmStateError, match="fails authentication"):
        farm_state.verify(released, mac, farm=FARM, key_for=keys)
    plain = state(version=3)
    body, mac = farm_state.seal(plain, KEY)
    document = json.loads(body)
    document.update(
        format="farmkeys-state/3",
        promotions=[],
        holds=[{"purpose": "signing", "secondary": str(HOLD.secondary), "since": 1}],
    )
    forged = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    farm_state.parse(forged)  # well formed, but not what the MAC covers
    with pytest.raises(FarmStateError, match="fails authentication"):
        farm_state.verify(forged, mac, farm=FARM, key_for=keys)


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda d: d["promotions"][0].update(purpose="all"), "unknown purpose"),
        (lambda d: d["promotions"][0].update(urgent=1), "urgent is not a boolean"),
        (lambda d: d["promotions"].append(d["promotions"][0]), "promotions is not sorted"),
        (lambda d: d["holds"][0].update(secondary="x"), "not a UUID"),
        (lambda d: d["holds"][0].pop("since"), "exactly the fields"),
        (lambda d: d.update(holds={}), "holds is not a list"),
        (lambda d: d.pop("promotions"), "exactly the fields"),
    ],
)
def test_malformed_promotions_and_holds_are_refused(edit: object, why: str) -> None:
    record = farm_state.FarmState.build(
        farm=FARM,
        version=3,
        term=1,
        master_key=KEY_ID,
        rows=rows(),
        promotions=[PROMOTION],
        holds=[HOLD],
    )
    document = json.loads(record.encode())
    edit(document)  # type: ignore[operator]
    body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(FarmStateError, match=why):
        farm_state.parse(body)


def test_a_format_2_record_still_reads_back_without_promotions_or_holds() -> None:
    old = state()
    body, mac = farm_state.seal(old, KEY)
    assert json.loads(body)["format"] == "farmkeys-state/2"
    got = farm_state.verify(body, mac, farm=FARM, key_for=keys)
    assert got.promotions == () and got.holds == () and got.format == farm_state.FORMAT_2
