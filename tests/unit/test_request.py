"""The operator request codec (farmkeys.formats.request), as docs/blob-format.md writes it down."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import uuid
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from farmkeys.errors import DirectoryError, RequestRefusedError
from farmkeys.formats import farm_state
from farmkeys.formats import request as request_format

FARM = uuid.UUID("0b3f6c0e-8a55-4a57-9d1c-6f6d2a7e9a01")
KEY_ID = uuid.UUID("5d2f0f4e-1b8e-4a9c-b7c1-3d0b8c2d4e11")
KEY = bytes(range(32))
WHO = request_format.Requester(account="alice via sudo as root", host="web1", reason="CHG-42")


def keys(key_id: uuid.UUID) -> bytes:
    if key_id == KEY_ID:
        return KEY
    raise DirectoryError(f"no key {key_id}", "test")


def request(**changes: Any) -> request_format.Request:
    made = request_format.Request(
        id=42,
        nonce=uuid.UUID(int=7),
        farm=FARM,
        kind="rollover",
        purpose="signing",
        urgent=False,
        requested_by="node-a",
        created=1_700_000_000,
        expires=1_700_000_180,
        master_key=KEY_ID,
        requester=WHO,
    )
    return replace(made, **changes)


def row(signed: request_format.Request, **changes: Any) -> SimpleNamespace:
    values: dict[str, Any] = {
        "requested_by": signed.requested_by,
        "purpose": signed.purpose,
        "urgent": signed.urgent,
        "master_key": signed.kind == "master_key",
        "repair_state": signed.kind == "repair_state",
        "revert": signed.kind == "revert",
        "import_blob": None,
        "import_certificate": None,
        "import_role": None,
        "import_source": None,
        "account": None if signed.requester is None else signed.requester.account,
        "host": None if signed.requester is None else signed.requester.host,
        "reason": None if signed.requester is None else signed.requester.reason,
    }
    return SimpleNamespace(**{**values, **changes})


def test_a_signed_request_verifies_and_reads_back_what_was_signed() -> None:
    body, mac = request_format.sign(request(), KEY)
    assert request_format.verify(body, mac, farm=FARM, row_id=42, key_for=keys) == request()


def test_the_mac_is_hmac_sha256_under_the_documented_hkdf_label() -> None:
    body, mac = request_format.sign(request(), KEY)
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=b"farmkeys operator request MAC v1\x00" + FARM.bytes,
    ).derive(KEY)
    assert mac == hmac.new(key, body, hashlib.sha256).digest()
    # Neither the farm state's key nor another farm's.
    assert request_format.mac_key(KEY, FARM) != farm_state.mac_key(KEY, FARM)
    assert request_format.mac_key(KEY, FARM) != request_format.mac_key(KEY, uuid.uuid4())


def test_the_body_has_exactly_the_documented_fields() -> None:
    document = json.loads(request().encode())
    assert sorted(document) == [
        "account",
        "created",
        "expires",
        "farm",
        "format",
        "host",
        "id",
        "import",
        "kind",
        "master_key",
        "nonce",
        "purpose",
        "reason",
        "repair",
        "requested_by",
        "urgent",
    ]
    assert document["format"] == "farmkeys-request/2"
    assert (document["account"], document["host"], document["reason"]) == (
        "alice via sudo as root",
        "web1",
        "CHG-42",
    )
    assert json.loads(request(requester=replace(WHO, reason=None)).encode())["reason"] is None


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"row_id": 43}, "another farm or another request row"),
        ({"farm": uuid.UUID(int=1)}, "another farm or another request row"),
    ],
)
def test_another_row_or_farm_is_refused(kw: dict[str, Any], why: str) -> None:
    body, mac = request_format.sign(request(), KEY)
    args: dict[str, Any] = {"farm": FARM, "row_id": 42, **kw}
    with pytest.raises(RequestRefusedError, match=why):
        request_format.verify(body, mac, key_for=keys, **args)


def test_a_changed_byte_a_wrong_key_or_no_mac_is_refused() -> None:
    body, mac = request_format.sign(request(), KEY)
    with pytest.raises(RequestRefusedError, match="MAC does not verify"):
        request_format.verify(body, bytes(32), farm=FARM, row_id=42, key_for=keys)
    urgent = body.replace(b'"urgent":false', b'"urgent":true')
    with pytest.raises(RequestRefusedError, match="MAC does not verify"):
        request_format.verify(urgent, mac, farm=FARM, row_id=42, key_for=keys)
    with pytest.raises(RequestRefusedError, match="carries no MAC"):
        request_format.verify(None, None, farm=FARM, row_id=42, key_for=keys)
    other = request(master_key=uuid.UUID(int=3))
    body, mac = request_format.sign(other, KEY)
    with pytest.raises(RequestRefusedError, match="re-issue"):
        request_format.verify(body, mac, farm=FARM, row_id=42, key_for=keys)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(kind="promote"),
        lambda d: d.update(purpose=None),
        lambda d: d.update(kind="master_key"),
        lambda d: d.update(repair={"rows": "x"}),
        lambda d: d.update(urgent=1),
        lambda d: d.update(id=-1),
        lambda d: d.update(extra=1),
    ],
)
def test_malformed_bodies_are_refused(edit: Any) -> None:
    document = json.loads(request().encode())
    edit(document)
    body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(RequestRefusedError, match="malformed"):
        request_format.parse(body)


def test_a_body_not_in_canonical_form_is_refused() -> None:
    body = json.dumps(json.loads(request().encode()), indent=1).encode()
    with pytest.raises(RequestRefusedError, match="canonical"):
        request_format.parse(body)


def test_repair_and_import_terms_round_trip() -> None:
    repair = request_format.RepairTerms(
        rows="ab" * 32, revoked=("A" * 40,), revoked_named=True, min_version=9
    )
    signed = request(kind="repair_state", purpose="all", repair=repair)
    assert request_format.parse(signed.encode()) == signed
    terms = request_format.ImportTerms(uuid.UUID(int=5), "primary", "AD FS", "cd" * 32)
    signed = request(kind="import", import_=terms)
    assert request_format.parse(signed.encode()) == signed


def test_columns_that_say_something_else_than_the_body_are_caught() -> None:
    signed = request()
    assert not request_format.columns_differ(signed, row(signed))
    assert request_format.columns_differ(signed, row(signed, repair_state=True))
    assert request_format.columns_differ(signed, row(signed, urgent=True))
    assert request_format.columns_differ(signed, row(signed, purpose="all"))
    assert request_format.columns_differ(signed, row(signed, requested_by="ops-alice"))
    blob = b"sealed"
    terms = request_format.ImportTerms(
        uuid.UUID(int=5), "primary", "AD FS", request_format.blob_digest(blob)
    )
    imported = request(kind="import", import_=terms)
    good = row(
        imported,
        import_blob=blob,
        import_certificate=terms.certificate,
        import_role="primary",
        import_source="AD FS",
    )
    assert not request_format.columns_differ(imported, good)
    assert request_format.columns_differ(
        imported, row(imported, **{**vars(good), "import_blob": b"other"})
    )
    assert request_format.columns_differ(
        imported, row(imported, **{**vars(good), "import_role": "secondary"})
    )


def test_a_revert_request_round_trips_and_its_mac_covers_the_kind_and_purpose() -> None:
    revert = request(kind="revert", purpose="decryption")
    body, mac = request_format.sign(revert, KEY)
    got = request_format.verify(body, mac, farm=FARM, row_id=42, key_for=keys)
    assert got == revert and got.describe() == "revert of the last decryption promotion"
    for old, new in ((b'"kind":"revert"', b'"kind":"rollover"'), (b"decryption", b"signing")):
        edited = body.replace(old, new)
        assert edited != body
        with pytest.raises(RequestRefusedError, match="MAC does not verify"):
            request_format.verify(edited, mac, farm=FARM, row_id=42, key_for=keys)


def test_a_revert_names_one_purpose_and_is_never_urgent() -> None:
    for changes in ({"purpose": "all"}, {"urgent": True}, {"purpose": None}):
        body, _ = request_format.sign(request(kind="revert", **changes), KEY)
        with pytest.raises(RequestRefusedError, match="malformed"):
            request_format.parse(body)


def test_columns_that_hide_or_fake_a_revert_are_caught() -> None:
    revert = request(kind="revert")
    assert not request_format.columns_differ(revert, row(revert))
    # A revert row whose column says a plain rollover, and a rollover's row made a revert.
    assert request_format.columns_differ(revert, row(revert, revert=False))
    assert request_format.columns_differ(request(), row(request(), revert=True))
    assert request_format.columns_differ(revert, row(revert, purpose="decryption"))


def test_freshness_is_judged_by_the_time_passed_in() -> None:
    signed = request()
    request_format.check_fresh(signed, now=signed.created)
    request_format.check_fresh(signed, now=signed.expires)
    with pytest.raises(RequestRefusedError, match="expired"):
        request_format.check_fresh(signed, now=signed.expires + 1)
    with pytest.raises(RequestRefusedError, match="future"):
        request_format.check_fresh(
            signed, now=signed.created - request_format.CLOCK_ALLOWANCE_SECONDS - 1
        )


def test_the_rows_digest_changes_with_any_field_of_any_row() -> None:
    entry = farm_state.LiveEntry(uuid.UUID(int=1), "signing", "primary", "A" * 40, KEY_ID)
    other = replace(entry, role="retired")
    assert request_format.rows_digest([entry]) != request_format.rows_digest([other])
    assert request_format.rows_digest([entry, other]) == request_format.rows_digest([other, entry])


# -- who asked (format 2) and the format-1 bodies of an older farmkeys -------------------


def v1_signed(signed: request_format.Request) -> tuple[bytes, bytes]:
    """A format-1 body and its MAC, as a farmkeys before format 2 made them."""
    body = replace(signed, requester=None).encode()
    return body, hmac.new(request_format.mac_key(KEY, FARM), body, hashlib.sha256).digest()


def test_who_asked_is_covered_by_the_mac() -> None:
    body, mac = request_format.sign(request(), KEY)
    for field, forged in (("account", "bob"), ("host", "web2"), ("reason", "routine")):
        document = json.loads(body)
        document[field] = forged
        edited = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        with pytest.raises(RequestRefusedError, match="MAC does not verify"):
            request_format.verify(edited, mac, farm=FARM, row_id=42, key_for=keys)


def test_a_format_1_body_is_read_with_its_requester_not_recorded() -> None:
    body, mac = v1_signed(request())
    document = json.loads(body)
    assert document["format"] == "farmkeys-request/1"
    assert "account" not in document and "reason" not in document
    read = request_format.verify(body, mac, farm=FARM, row_id=42, key_for=keys)
    assert read.requester is None
    assert read == replace(request(), requester=None)


@pytest.mark.parametrize(
    "edit",
    [
        # A format-1 body with a requester, and a format-2 body without one.
        lambda d: d.update(format="farmkeys-request/1"),
        lambda d: d.pop("account"),
        lambda d: d.update(format="farmkeys-request/3"),
    ],
)
def test_a_body_whose_fields_do_not_fit_its_format_is_refused(edit: Any) -> None:
    document = json.loads(request().encode())
    edit(document)
    body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(RequestRefusedError, match="malformed"):
        request_format.parse(body)


def test_a_new_request_is_never_signed_without_its_requester() -> None:
    with pytest.raises(ValueError, match="requester"):
        request_format.sign(request(requester=None), KEY)
    with pytest.raises(ValueError, match="control character"):
        request_format.sign(request(requester=replace(WHO, reason="a\nb")), KEY)


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("reason", "two\nlines", "control character U+000A"),
        ("reason", "\x1b[8mhidden", "control character U+001B"),
        ("reason", "abc\u202edcba", "control character U+202E"),
        ("reason", "x" * 201, "201 characters long, more than 200"),
        ("reason", "", "empty"),
        ("reason", "no\u00a0break", "non-printing character U+00A0"),
        ("account", "alice\rroot", "control character U+000D"),
        ("account", "a" * 201, "more than 200"),
        ("host", "h" * 256, "more than 255"),
        ("host", 7, "not text"),
    ],
)
def test_a_signed_body_with_an_unfit_requester_is_refused_as_malformed(
    field: str, value: object, why: str
) -> None:
    document = json.loads(request().encode())
    document[field] = value
    body = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(RequestRefusedError, match=f"its {field} is unfit: .*{re.escape(why)}"):
        request_format.parse(body)


def test_the_longest_reason_and_ordinary_text_are_fit() -> None:
    assert request_format.text_problem("x" * 200, limit=request_format.MAX_REASON) is None
    reason = "Zertifikat erneuert, Ticket #42 (Müller) — CORP\\alice"
    signed = request(requester=replace(WHO, reason=reason))
    assert request_format.parse(signed.encode()) == signed


def test_columns_that_say_someone_else_asked_are_caught() -> None:
    signed = request()
    assert not request_format.columns_differ(signed, row(signed))
    assert request_format.columns_differ(signed, row(signed, account="bob"))
    assert request_format.columns_differ(signed, row(signed, host="web2"))
    assert request_format.columns_differ(signed, row(signed, reason="routine"))
    assert request_format.columns_differ(signed, row(signed, reason=None))
    old = request(requester=None)  # a format-1 body: its row names nobody
    assert not request_format.columns_differ(old, row(old))
    assert request_format.columns_differ(old, row(old, account="alice"))


def test_a_leader_from_before_revert_is_recognised_by_its_refusal() -> None:
    # An older leader parses a revert's body, finds its kind unknown and refuses it as
    # malformed; the command then says to upgrade the leader rather than print the refusal.
    from farmkeys import requesting

    body, _ = request_format.sign(request(kind="revert"), KEY)
    document = json.loads(body)
    older_kinds = ("rollover", "master_key", "repair_state", "import")
    assert document["kind"] not in older_kinds
    refusal = "refused: the request is malformed: its kind is unknown"
    assert requesting._refused_by_an_older_leader(refusal)
    assert not requesting._refused_by_an_older_leader("refused: request 4 is not authentic")
