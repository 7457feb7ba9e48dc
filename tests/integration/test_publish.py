"""Publishing the keys: SAML metadata and JWKS from a real farm's store, read back by a
relying party's own libraries (pysaml2's schema and metadata parser, signxml), and
promotion held back until every relying party fetched the secondary."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import xmlschema
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from farmtools import TestFarm, add_certificate, db_query, expect_ok, leader_check, one_error_line
from federation import metadata_schema
from lxml import etree
from saml2.attribute_converter import ac_factory
from saml2.mdstore import InMemoryMetaData
from signxml import XMLSigner, XMLVerifier
from signxml.exceptions import InvalidSignature

from farmkeys import publish
from farmkeys.config import load
from farmkeys.db import ConfigDB
from farmkeys.directory import Directory
from farmkeys.store import Store

ENTITY = "https://fs.contoso.example/adfs/services/trust"
SSO = "https://fs.contoso.example/adfs/ls/"
PUBLISH = {"entity_id": ENTITY, "sso_url": SSO}
CALM_POLICY: dict[str, Any] = {"rollover_interval_seconds": 3600}


@pytest.fixture
def publishing_farm(farm: TestFarm) -> TestFarm:
    """The farm, not initialised, with PUBLISH and a policy that rolls nothing by itself."""
    farm.overrides["publish"] = dict(PUBLISH)
    farm.overrides["policy"] = dict(CALM_POLICY)
    return farm


@pytest.fixture
def synced(publishing_farm: TestFarm) -> TestFarm:
    for args in (("init",), ("sync",)):
        result = publishing_farm.run(*args)
        expect_ok(result)
    return publishing_farm


def sync(farm: TestFarm, node: str = "node-a") -> None:
    result = farm.run("sync", node=node)
    expect_ok(result)


def live(farm: TestFarm, purpose: str, role: str) -> str:
    rows = db_query(
        farm.dsn,
        "SELECT thumbprint FROM certificate WHERE purpose = %s AND role = %s",
        (purpose, role),
    )
    assert len(rows) == 1, rows
    return str(rows[0]["thumbprint"])


def descriptors(xml: bytes, role: str = "md:IDPSSODescriptor") -> list[tuple[str, str]]:
    """(use, thumbprint of the certificate) of every KeyDescriptor of ``role``, in order."""
    found = []
    root = etree.fromstring(xml)
    ns = {"md": "urn:oasis:names:tc:SAML:2.0:metadata", "ds": "http://www.w3.org/2000/09/xmldsig#"}
    for kd in root.iterfind(f"{role}/md:KeyDescriptor", ns):
        der = base64.b64decode(kd.findtext(".//ds:X509Certificate", namespaces=ns))
        found.append((kd.get("use"), hashlib.sha1(der).hexdigest().upper()))
    return found


def parsed_by_pysaml2(xml: bytes) -> InMemoryMetaData:
    metadata = InMemoryMetaData(ac_factory(), metadata=xml.decode())
    metadata.load()
    return metadata


def thumbprint_of_b64(text: str) -> str:
    return hashlib.sha1(base64.b64decode("".join(text.split()))).hexdigest().upper()


# -- the metadata ------------------------------------------------------------------------


def test_metadata_lists_primary_secondary_and_retired_signing_and_the_primary_decryption(
    synced: TestFarm,
) -> None:
    secondary = add_certificate(synced, purpose="signing", role="secondary")
    retired = add_certificate(synced, purpose="signing", role="retired")
    add_certificate(synced, purpose="decryption", role="secondary")
    sync(synced)

    result = synced.run("metadata")
    expect_ok(result)
    xml = result.out.encode()
    metadata_schema().validate(xml)  # SAML 2.0 metadata, xmldsig, WS-Federation 1.2
    assert descriptors(xml) == [
        ("signing", live(synced, "signing", "primary")),
        ("signing", secondary),
        ("signing", retired),
        ("encryption", live(synced, "decryption", "primary")),
    ]
    # The WS-Federation role lists the same signing keys, as AD FS's does.
    assert descriptors(xml, "md:RoleDescriptor") == descriptors(xml)[:3]
    # A relying party's library finds every signing certificate, and only the primary
    # decryption one as the encryption key.
    metadata = parsed_by_pysaml2(xml)
    signing = {thumbprint_of_b64(c) for _, c in metadata.certs(ENTITY, "idpsso", "signing")}
    assert signing == {live(synced, "signing", "primary"), secondary, retired}
    encryption = [thumbprint_of_b64(c) for _, c in metadata.certs(ENTITY, "idpsso", "encryption")]
    assert encryption == [live(synced, "decryption", "primary")]
    locations = {
        s["location"]
        for s in metadata.service(ENTITY, "idpsso_descriptor", "single_sign_on_service").get(
            "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect", []
        )
    }
    assert locations == {SSO}


def test_a_retired_certificate_leaves_the_metadata_at_its_not_after(synced: TestFarm) -> None:
    retired = add_certificate(synced, purpose="signing", role="retired")
    sync(synced)
    found = Store(synced.store(), node_id="node-a").public_certificates()
    assert found is not None
    manifest, pems = found
    (entry,) = [e for e in manifest.certificates if e.thumbprint == retired]
    before = publish.published(manifest, pems, now=entry.not_after - timedelta(seconds=1))
    at = publish.published(manifest, pems, now=entry.not_after)
    assert retired in before.signing_thumbprints
    assert retired not in at.signing_thumbprints
    assert at.signing_thumbprints == (live(synced, "signing", "primary"),)


def test_metadata_is_refused_by_the_schema_when_tampered(synced: TestFarm) -> None:
    """The schema check is real: the document without its SingleSignOnService fails it."""
    xml = synced.run("metadata").out
    broken = "\n".join(line for line in xml.splitlines() if "SingleSignOnService" not in line)
    with pytest.raises(xmlschema.XMLSchemaValidationError):
        metadata_schema().validate(broken)


def test_metadata_arguments_override_the_config(synced: TestFarm) -> None:
    result = synced.run(
        "metadata", "--entity-id", "urn:other", "--sso-url", "https://other.example/sso"
    )
    expect_ok(result)
    root = etree.fromstring(result.out.encode())
    assert root.get("entityID") == "urn:other"


def test_metadata_without_an_entity_id_is_one_clear_error(synced: TestFarm) -> None:
    synced.overrides["publish"] = {"sso_url": SSO}
    result = synced.run("metadata")
    assert result.code == 1
    line = one_error_line(result)
    assert "publish.entity_id is not set" in line
    assert "--entity-id" in line
    assert result.out == ""


def test_publishing_before_the_first_sync_is_one_clear_error(publishing_farm: TestFarm) -> None:
    expect_ok(publishing_farm.run("init"))
    for command in ("metadata", "jwks"):
        result = publishing_farm.run(command)
        assert result.code == 1
        assert "run `farmkeys sync` on this node first" in one_error_line(result)


def test_every_node_publishes_the_same_bytes(synced: TestFarm) -> None:
    add_certificate(synced, purpose="signing", role="secondary")
    for node in ("node-a", "node-b"):
        sync(synced, node)
    for command in ("metadata", "jwks"):
        a = synced.run(command, node="node-a")
        b = synced.run(command, node="node-b")
        expect_ok(a)
        expect_ok(b)
        assert a.out == b.out


def test_invalid_publish_settings_are_refused_when_the_config_loads(
    publishing_farm: TestFarm,
) -> None:
    for bad, says in (
        ({"listen": "9464"}, "publish.listen must be HOST:PORT"),
        ({"entity_id": "not a uri"}, "publish.entity_id must be an absolute URI"),
        ({"sso_url": "ftp://x.example/sso"}, "publish.sso_url must be an http(s) URL"),
        ({"relying_parties": ["ok", "bad name"]}, "whose name is not 1 to 64"),
        ({"relying_parties": ["a", "a=https://a.example"]}, "names a relying party twice"),
    ):
        publishing_farm.overrides["publish"] = bad
        result = publishing_farm.run("status")
        assert result.code == 3, bad
        assert says in one_error_line(result), (bad, result.err)


# -- the JWKS ------------------------------------------------------------------------------


def _b64url_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def test_jwks_describes_each_rsa_signing_key_as_adfs_does(synced: TestFarm) -> None:
    secondary = add_certificate(synced, purpose="signing", role="secondary")
    sync(synced)
    result = synced.run("jwks")
    expect_ok(result)
    keys = json.loads(result.out)["keys"]
    assert [thumbprint_of_b64(k["x5c"][0]) for k in keys] == [
        live(synced, "signing", "primary"),
        secondary,
    ]
    for key in keys:
        certificate = x509.load_der_x509_certificate(base64.b64decode(key["x5c"][0]))
        sha1 = certificate.fingerprint(hashes.SHA1())
        expected = base64.urlsafe_b64encode(sha1).rstrip(b"=").decode()
        assert key["kid"] == key["x5t"] == expected
        assert (key["kty"], key["use"], key["alg"]) == ("RSA", "sig", "RS256")
        numbers = certificate.public_key().public_numbers()
        assert isinstance(certificate.public_key(), rsa.RSAPublicKey)
        assert _b64url_int(key["n"]) == numbers.n
        assert _b64url_int(key["e"]) == numbers.e == 65537


def test_jwks_describes_an_ec_p256_signing_key(publishing_farm: TestFarm) -> None:
    publishing_farm.overrides["policy"] = {**CALM_POLICY, "key": "ec-p256"}
    for args in (("init",), ("sync",)):
        expect_ok(publishing_farm.run(*args))
    (key,) = json.loads(publishing_farm.run("jwks").out)["keys"]
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")
    certificate = x509.load_der_x509_certificate(base64.b64decode(key["x5c"][0]))
    public = certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    numbers = public.public_numbers()
    assert (_b64url_int(key["x"]), _b64url_int(key["y"])) == (numbers.x, numbers.y)
    assert len(base64.urlsafe_b64decode(key["x"] + "=")) == 32


# -- interop: a relying party verifies what the farm signs -----------------------------


ASSERTION = (
    '<saml:Assertion xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="_a1"'
    ' Version="2.0" IssueInstant="2026-11-22T10:00:00Z"><saml:Issuer>{issuer}</saml:Issuer>'
    "<saml:Subject><saml:NameID>alice@contoso.example</saml:NameID></saml:Subject>"
    "</saml:Assertion>"
)


def sign_with_store(farm: TestFarm) -> bytes:
    """A SAML assertion signed as the federation service would: with the store's primary."""
    signing = farm.store() / "signing"
    signed = XMLSigner(c14n_algorithm="http://www.w3.org/2001/10/xml-exc-c14n#").sign(
        etree.fromstring(ASSERTION.format(issuer=ENTITY)),
        key=(signing / "primary.key").read_bytes(),
    )
    return etree.tostring(signed)


def published_signing_certificates(farm: TestFarm) -> list[str]:
    metadata = parsed_by_pysaml2(farm.run("metadata").out.encode())
    return [
        "-----BEGIN CERTIFICATE-----\n" + c + "\n-----END CERTIFICATE-----\n"
        for _, c in metadata.certs(ENTITY, "idpsso", "signing")
    ]


def verifies_with(signed: bytes, certificate_pem: str) -> bool:
    try:
        XMLVerifier().verify(signed, x509_cert=certificate_pem)
    except InvalidSignature:
        return False
    return True


def test_an_assertion_signed_with_the_store_verifies_with_the_published_metadata(
    synced: TestFarm,
) -> None:
    before = sign_with_store(synced)
    certificates = published_signing_certificates(synced)
    assert verifies_with(before, certificates[0])

    result = synced.run("rollover", "--purpose", "signing", "--urgent", "--yes")
    expect_ok(result)
    sync(synced)
    after = sign_with_store(synced)
    certificates = published_signing_certificates(synced)
    # The new primary signs; the relying party, with the metadata fetched after the
    # rollover, verifies it, and the old certificate does not verify it.
    assert verifies_with(after, certificates[0])
    new_primary = x509.load_pem_x509_certificate(certificates[0].encode())
    assert not any(
        verifies_with(after, c)
        for c in certificates
        if x509.load_pem_x509_certificate(c.encode()) != new_primary
    )
    assert not verifies_with(before, certificates[0])


# -- promotion that waits for the relying parties ---------------------------------------


PARTIES = ["rp1=https://rp1.example/saml/metadata", "rp2"]


def due_secondary(farm: TestFarm) -> str:
    """A signing secondary generated six days ago: past AD FS's five-day promotion."""
    thumbprint = add_certificate(farm, purpose="signing", role="secondary")
    with psycopg.connect(farm.dsn) as conn:
        conn.execute(
            "UPDATE certificate SET created_at = now() - interval '6 days' WHERE thumbprint = %s",
            (thumbprint,),
        )
    return thumbprint


def record_fetch(farm: TestFarm, rp: str, *thumbprints: str, signed: bool = True) -> None:
    """A fetch recorded as node-b's serve records it: each thumbprint marked with its fetch
    MAC under the current master key (``signed``), or unmarked, as a DB writer could."""
    from farmkeys.formats import fetch_record

    config = load(farm.config())
    with (
        ConfigDB(config.database, config.retry) as db,
        Directory(config.directory, config.retry) as directory,
    ):
        if not signed:
            db.record_fetch(rp, node_id="node-b", document="metadata", thumbprints=thumbprints)
            return
        group = db.require_farm().dkm_group
        key_id = directory.current_key_id(group)
        key = fetch_record.mac_key(directory.master_key(group, key_id), group)
        macs = [
            fetch_record.sign(key, farm=group, relying_party=rp, thumbprint=t) for t in thumbprints
        ]
        db.record_fetch(
            rp,
            node_id="node-b",
            document="metadata",
            thumbprints=thumbprints,
            macs=macs,
            mac_key=key_id,
        )


def status(farm: TestFarm) -> dict[str, Any]:
    result = farm.run("status", "--json")
    assert result.code in (0, 1), result.err
    return dict(result.json)


def test_require_fetch_holds_promotion_until_every_relying_party_fetched(
    synced: TestFarm,
) -> None:
    synced.overrides["publish"] = {**PUBLISH, "relying_parties": PARTIES}
    synced.overrides["policy"] = {**CALM_POLICY, "require_fetch": True}
    primary = live(synced, "signing", "primary")
    secondary = due_secondary(synced)

    assert leader_check(synced) == []
    doc = status(synced)
    waits = [p for p in doc["problems"] if "waits for relying parties" in p]
    assert len(waits) == 1
    assert "rp1, rp2; it is promoted regardless at" in waits[0]
    assert {rp["name"]: rp["has_secondary"] for rp in doc["relying_parties"]} == {
        "rp1": False,
        "rp2": False,
    }

    record_fetch(synced, "rp1", primary, secondary)
    record_fetch(synced, "rp2", primary)  # fetched before the secondary existed
    assert leader_check(synced) == []
    doc = status(synced)
    (wait,) = [p for p in doc["problems"] if "waits for relying parties" in p]
    assert "rp2" in wait and "rp1" not in wait
    rp1 = next(rp for rp in doc["relying_parties"] if rp["name"] == "rp1")
    assert rp1["url"] == "https://rp1.example/saml/metadata"
    assert rp1["has_secondary"] is True and rp1["last_node"] == "node-b"
    assert rp1["fetched"] == sorted([primary, secondary])

    record_fetch(synced, "rp2", primary, secondary)
    assert leader_check(synced) == ["promote signing"]
    assert live(synced, "signing", "primary") == secondary
    assert not [p for p in status(synced)["problems"] if "waits for" in p]


def test_a_forged_fetch_row_never_releases_a_held_promotion(synced: TestFarm) -> None:
    synced.overrides["publish"] = {**PUBLISH, "relying_parties": PARTIES}
    synced.overrides["policy"] = {**CALM_POLICY, "require_fetch": True}
    primary = live(synced, "signing", "primary")
    secondary = due_secondary(synced)
    record_fetch(synced, "rp1", primary, secondary)
    # A config DB writer: rp2's row with no MAC, then with a MAC that does not verify.
    record_fetch(synced, "rp2", primary, secondary, signed=False)
    assert leader_check(synced) == []
    with psycopg.connect(synced.dsn) as conn:
        key_id = conn.execute(
            "SELECT mac_key FROM relying_party_fetch WHERE mac_key IS NOT NULL LIMIT 1"
        ).fetchone()
        assert key_id is not None
        conn.execute(
            "UPDATE relying_party_fetch SET mac = decode(repeat('00', 32), 'hex'), mac_key = %s"
            " WHERE relying_party = 'rp2'",
            (key_id[0],),
        )
    assert leader_check(synced) == []
    assert live(synced, "signing", "primary") == primary
    # The node's own record releases it.
    record_fetch(synced, "rp2", primary, secondary)
    assert leader_check(synced) == ["promote signing"]


def test_require_fetch_gives_way_at_the_critical_threshold(synced: TestFarm) -> None:
    synced.overrides["publish"] = {**PUBLISH, "relying_parties": PARTIES}
    synced.overrides["policy"] = {**CALM_POLICY, "require_fetch": True}
    secondary = due_secondary(synced)
    with psycopg.connect(synced.dsn) as conn:  # the primary now ends inside critical_threshold
        conn.execute(
            "UPDATE certificate SET not_after = now() + interval '1 day'"
            " WHERE purpose = 'signing' AND role = 'primary'"
        )
    assert leader_check(synced) == ["promote signing"]
    assert live(synced, "signing", "primary") == secondary
    (event,) = db_query(synced.dsn, "SELECT detail FROM audit_event WHERE action = 'promote'")
    assert "not yet fetched by rp1, rp2" in event["detail"]


def test_without_require_fetch_promotion_does_not_wait(synced: TestFarm) -> None:
    """AD FS's behaviour, the default: the relying parties are shown, not waited for."""
    synced.overrides["publish"] = {**PUBLISH, "relying_parties": PARTIES}
    secondary = due_secondary(synced)
    doc = status(synced)
    assert not [p for p in doc["problems"] if "waits for" in p]
    assert [rp["has_secondary"] for rp in doc["relying_parties"]] == [False, False]
    assert leader_check(synced) == ["promote signing"]
    assert live(synced, "signing", "primary") == secondary


def test_the_decryption_secondary_never_waits_for_fetches(synced: TestFarm) -> None:
    """Relying parties are only ever shown the primary decryption certificate."""
    synced.overrides["publish"] = {**PUBLISH, "relying_parties": PARTIES}
    synced.overrides["policy"] = {**CALM_POLICY, "require_fetch": True}
    secondary = add_certificate(synced, purpose="decryption", role="secondary")
    with psycopg.connect(synced.dsn) as conn:
        conn.execute(
            "UPDATE certificate SET created_at = now() - interval '6 days' WHERE thumbprint = %s",
            (secondary,),
        )
    assert leader_check(synced) == ["promote decryption"]


def test_the_fetch_table_refuses_what_is_not_a_name_and_a_thumbprint(synced: TestFarm) -> None:
    config = load(synced.config())
    with ConfigDB(config.database, dataclasses.replace(config.retry, total_seconds=0)) as db:
        for rp, thumbprint in (("bad name", "A" * 40), ("rp1", "not-a-thumbprint")):
            with pytest.raises(Exception, match="check constraint"):
                db.record_fetch(rp, node_id="n", document="jwks", thumbprints=[thumbprint])
    assert db_query(synced.dsn, "SELECT count(*) AS n FROM relying_party_fetch")[0]["n"] == 0


def test_published_keys_hold_no_private_material(synced: TestFarm) -> None:
    add_certificate(synced, purpose="signing", role="secondary")
    sync(synced)
    store = synced.store()
    keys = [p.read_bytes() for p in (store / "signing").glob("*.key")]
    keys += [p.read_bytes() for p in (store / "decryption").glob("*.key")]
    for command in ("metadata", "jwks"):
        out = synced.run(command).out
        assert "PRIVATE" not in out
        for key in keys:
            body = b"".join(key.splitlines()[1:-1]).decode()
            assert body[:40] not in out.replace("\n", "")
    jwks = json.loads(synced.run("jwks").out)
    assert not {"d", "p", "q", "dp", "dq", "qi"} & {k for key in jwks["keys"] for k in key}


def test_public_certificates_refuses_a_file_that_is_not_the_manifests(synced: TestFarm) -> None:
    """A certificate file changed behind farmkeys' back is not published."""
    store = Store(synced.store(), node_id="node-a")
    primary = live(synced, "signing", "primary")
    target = (synced.store() / "signing" / f"{primary}.pem").resolve()
    other = x509.load_pem_x509_certificate(
        (synced.store() / "decryption" / "primary.pem").read_bytes()
    )
    target.chmod(0o644)
    target.write_bytes(other.public_bytes(Encoding.PEM))
    with pytest.raises(Exception, match="is not the file its manifest records"):
        store.public_certificates()
    result = synced.run("jwks")
    assert result.code == 1
    assert "farmkeys sync" in one_error_line(result)


def test_now_is_passed_in(synced: TestFarm) -> None:
    """published() reads no clock: the same store gives the same keys at the same time."""
    found = Store(synced.store(), node_id="node-a").public_certificates()
    assert found is not None
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert publish.published(*found, now=now) == publish.published(*found, now=now)


def test_after_an_urgent_rollover_status_warns_until_every_relying_party_has_the_new_key(
    synced: TestFarm,
) -> None:
    synced.overrides["publish"] = {**PUBLISH, "relying_parties": PARTIES}
    old = live(synced, "signing", "primary")
    record_fetch(synced, "rp1", old)
    record_fetch(synced, "rp2", old)
    assert not [p for p in status(synced)["problems"] if "have not fetched" in p]

    expect_ok(synced.run("rollover", "--urgent", "--yes", "--purpose", "signing"))
    new = live(synced, "signing", "primary")
    assert new != old

    def lacking() -> list[str]:
        found = [p for p in status(synced)["problems"] if "have not fetched the signing" in p]
        assert all(new in p for p in found)
        return found

    (warning,) = lacking()
    assert "relying parties rp1, rp2 have not fetched the signing primary" in warning
    record_fetch(synced, "rp1", new)
    (warning,) = lacking()
    assert "relying parties rp2 have" in warning
    # A config DB writer's row for rp2, with no MAC or a MAC that does not verify: still warned.
    record_fetch(synced, "rp2", new, signed=False)
    assert lacking()
    with psycopg.connect(synced.dsn) as conn:
        conn.execute(
            "UPDATE relying_party_fetch SET mac = decode(repeat('00', 32), 'hex'),"
            " mac_key = (SELECT mac_key FROM relying_party_fetch WHERE relying_party = 'rp1'"
            " AND mac_key IS NOT NULL LIMIT 1) WHERE relying_party = 'rp2'"
        )
    assert lacking()
    record_fetch(synced, "rp2", new)
    assert lacking() == []
