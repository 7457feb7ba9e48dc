"""The signed federation metadata as a relying party gets it: served over HTTP by the
:class:`~farmkeys.publish.Publisher` on a real farm's store (PostgreSQL and slapd; the farm
initialised, synced and rolled over by the CLI and a leader), verified by xmlsec1 and by
signxml against the signing primary's certificate, before and after a promotion, on an RSA
and an EC P-256 farm; the same bytes from two nodes; refused when one byte changes; and
the unsigned document with ``sign_metadata = false``. A Shibboleth SP loads it in
tests/system/test_shibboleth_sp.py."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from farmtools import TestFarm, add_certificate, db_query, expect_ok, leader_check
from federation import NS, metadata_schema, one_byte_changed, signxml_verifies, xmlsec1_verifies
from lxml import etree
from test_publish_http import free_port

from farmkeys import publish
from farmkeys.config import PublishConfig, load
from farmkeys.errors import StoreError
from farmkeys.publish import Health, Publisher
from farmkeys.store import Store

PUBLISH = {
    "entity_id": "https://fs.contoso.example/adfs/services/trust",
    "sso_url": "https://fs.contoso.example/adfs/ls/",
}
NOON = datetime(2026, 12, 4, 12, tzinfo=UTC)


def initialised(farm: TestFarm, **policy: object) -> TestFarm:
    farm.overrides["publish"] = dict(PUBLISH)
    farm.overrides["policy"] = {"rollover_interval_seconds": 3600, **policy}
    for args in (("init",), ("sync",)):
        expect_ok(farm.run(*args))
    expect_ok(farm.run("sync", node="node-b"))
    return farm


@pytest.fixture
def synced(farm: TestFarm) -> TestFarm:
    """An RSA farm (the default key), synced on node-a and node-b."""
    return initialised(farm)


@pytest.fixture
def ec_synced(farm: TestFarm) -> TestFarm:
    """A farm whose keys are EC P-256 ([policy] key), synced on node-a and node-b."""
    return initialised(farm, key="ec-p256")


Serve = Callable[..., tuple[Publisher, str]]


@pytest.fixture
def serve(farm: TestFarm) -> Iterator[Serve]:
    """``serve(node="node-a", clock=..., **publish_settings)``: a started Publisher on that
    node's store and the URL of its metadata; stopped after the test."""
    started: list[Publisher] = []

    def start(
        node: str = "node-a", clock: Callable[[], datetime] = lambda: NOON, **settings: object
    ) -> tuple[Publisher, str]:
        port = free_port()
        config = PublishConfig(
            **{**PUBLISH, "listen": f"127.0.0.1:{port}", **settings}  # type: ignore[arg-type]
        )
        publisher = Publisher(
            config,
            Store(farm.store(node), node_id=node),
            record=lambda rp, doc, tps: None,
            metrics=lambda: b"",
            health=lambda: Health(True, {"status": "ok"}),
            clock=clock,
        )
        publisher.start()
        started.append(publisher)
        return publisher, f"http://127.0.0.1:{port}{publish.METADATA_PATH}"

    yield start
    for publisher in started:
        publisher.stop()


def fetch(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.headers["ETag"], response.read()


def primary_pem(farm: TestFarm, node: str = "node-a") -> bytes:
    return (farm.store(node) / "signing" / "primary.pem").read_bytes()


def both_verify(xml: bytes, certificate: bytes) -> tuple[bool, bool]:
    return xmlsec1_verifies(xml, certificate), signxml_verifies(xml, certificate)


def promote_the_secondary(farm: TestFarm) -> str:
    """A signing secondary generated six days ago, promoted by one leader check (AD FS's
    five days past), then synced to node-a; its thumbprint."""
    secondary = add_certificate(farm, purpose="signing", role="secondary")
    with psycopg.connect(farm.dsn) as conn:
        conn.execute(
            "UPDATE certificate SET created_at = now() - interval '6 days' WHERE thumbprint = %s",
            (secondary,),
        )
    assert leader_check(farm) == ["promote signing"]
    expect_ok(farm.run("sync"))
    return secondary


def test_the_served_metadata_verifies_with_the_primary_before_and_after_a_promotion(
    synced: TestFarm, serve: Serve
) -> None:
    publisher, url = serve()
    old = primary_pem(synced)
    _, before = fetch(url)
    assert both_verify(before, old) == (True, True)
    metadata_schema().validate(before)

    (old_thumbprint,) = [
        r["thumbprint"]
        for r in db_query(
            synced.dsn,
            "SELECT thumbprint FROM certificate WHERE role = 'primary' AND purpose = 'signing'",
        )
        if f"<ds:KeyName>{r['thumbprint']}</ds:KeyName>".encode() in before
    ]
    secondary = promote_the_secondary(synced)
    new = primary_pem(synced)
    assert new != old
    _, after = fetch(url)
    # The new primary signs it; the old certificate, still published (retired), does not
    # verify it, and the new one does not verify the document from before the promotion.
    assert both_verify(after, new) == (True, True)
    assert both_verify(after, old) == (False, False)
    assert both_verify(before, new) == (False, False)
    root = etree.fromstring(after)
    listed = [
        kd.findtext(".//ds:KeyName", namespaces=NS)
        for kd in root.iterfind("md:IDPSSODescriptor/md:KeyDescriptor[@use='signing']", NS)
    ]
    assert listed == [secondary, old_thumbprint]  # the new primary, then the retired one
    signer = root.findtext("ds:Signature/ds:KeyInfo/ds:X509Data/ds:X509Certificate", namespaces=NS)
    assert signer is not None and signer in "".join(new.decode().splitlines()[1:-1])
    assert publisher.documents.builds == 2


def test_every_node_serves_the_same_signed_bytes_and_etag(synced: TestFarm, serve: Serve) -> None:
    _, url_a = serve("node-a")
    _, url_b = serve("node-b", clock=lambda: NOON + timedelta(hours=11))  # the same day
    tag_a, body_a = fetch(url_a)
    tag_b, body_b = fetch(url_b)
    assert (tag_a, body_a) == (tag_b, body_b)
    assert tag_a == publish.etag(body_a)
    # The CLI prints the same bytes in the same window.
    printed = publish.metadata_of_store(
        load(synced.config()).publish, Store(synced.store(), node_id="node-a"), now=NOON
    )
    assert printed == body_a
    assert both_verify(body_a, primary_pem(synced, "node-b")) == (True, True)


def test_one_changed_byte_fails_both_verifiers(synced: TestFarm, serve: Serve) -> None:
    _, url = serve()
    _, body = fetch(url)
    certificate = primary_pem(synced)
    for old, new in (
        (b"https://fs.contoso.example/adfs/ls/", b"https://fs.contoso.example/adfs/lt/"),
        (b'validUntil="2026-12-11', b'validUntil="2026-12-19'),
        (b'use="encryption"', b'use="encryptiom"'),
    ):
        at_root = old.startswith(b"validUntil")
        changed = body.replace(old, new, 1) if at_root else one_byte_changed(body, old, new)
        assert changed != body
        assert both_verify(changed, certificate) == (False, False), old


def test_the_signed_document_turns_with_the_day_and_is_built_once_per_window(
    synced: TestFarm, serve: Serve
) -> None:
    now = [NOON]
    publisher, url = serve(clock=lambda: now[0])
    tag, body = fetch(url)
    now[0] = NOON.replace(hour=23, minute=59, second=59)
    assert fetch(url) == (tag, body)
    assert publisher.documents.builds == 1
    now[0] = NOON + timedelta(days=1)
    next_tag, next_body = fetch(url)
    assert next_tag != tag
    assert etree.fromstring(next_body).get("validUntil") == "2026-12-12T00:00:00Z"
    assert both_verify(next_body, primary_pem(synced)) == (True, True)
    jwks = url.replace(publish.METADATA_PATH, publish.JWKS_PATH)
    fetch(jwks)
    now[0] += timedelta(days=1)
    fetch(jwks)  # the JWKS has no window: built once
    assert publisher.documents.builds == 3


def test_an_ec_p256_farm_signs_its_metadata_with_deterministic_ecdsa(
    ec_synced: TestFarm, serve: Serve
) -> None:
    _, url = serve()
    _, body = fetch(url)
    method = etree.fromstring(body).find("ds:Signature/ds:SignedInfo/ds:SignatureMethod", NS)
    assert method.get("Algorithm") == "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256"
    assert both_verify(body, primary_pem(ec_synced)) == (True, True)
    assert both_verify(
        one_byte_changed(body, b"adfs/ls/", b"adfs/lt/"), primary_pem(ec_synced)
    ) == (
        False,
        False,
    )
    # RFC 6979: another node, another Publisher, the same bytes.
    _, other = fetch(serve("node-b")[1])
    assert other == body


def test_sign_metadata_false_serves_the_unsigned_document(synced: TestFarm, serve: Serve) -> None:
    _, url = serve(sign_metadata=False)
    _, body = fetch(url)
    keys = publish.from_store(Store(synced.store(), node_id="node-a"), now=NOON)
    assert body == publish.metadata(keys, **PUBLISH)
    assert b"Signature" not in body and b"RoleDescriptor" not in body and b"validUntil" not in body
    assert both_verify(body, primary_pem(synced)) == (False, False)


def test_the_private_key_is_read_only_as_its_manifest_records_it(synced: TestFarm) -> None:
    store = Store(synced.store(), node_id="node-a")
    found = store.certificates_and_signing_key()
    assert found is not None
    manifest, pems, key = found
    assert key == (synced.store() / "signing" / "primary.key").read_bytes()
    assert pems.keys() == {e.thumbprint for e in manifest.certificates}
    # Another valid key in its place: refused, naming the file and not its content.
    other = (synced.store() / "decryption" / "primary.key").read_bytes()
    target = (synced.store() / "signing" / "primary.key").resolve()
    target.chmod(0o600)
    target.write_bytes(other)
    with pytest.raises(StoreError, match="is not the file its manifest records") as refused:
        store.certificates_and_signing_key()
    assert other.splitlines()[1][:24].decode() not in refused.value.diagnostics()
    assert store.public_certificates() is not None  # the certificates are still as installed
    result = synced.run("metadata")
    assert result.code == 1 and "PRIVATE" not in result.err and result.out == ""
