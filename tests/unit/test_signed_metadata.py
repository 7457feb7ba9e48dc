"""The signed federation metadata without a server: the XML farmkeys writes is its own
exclusive canonical form (checked against lxml's canonicaliser), its enveloped signature
verifies with signxml (RSA-SHA256 and ECDSA-SHA256) and is deterministic, the validity
window is the UTC day, and the WS-Federation role has the WS-Federation 1.2 schema's shape
(tests/support/federation.py). xmlsec1 and Shibboleth verify it on a real farm's store:
tests/integration/test_publish_signed.py and tests/system/test_shibboleth_sp.py."""

from __future__ import annotations

import base64
import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import xmlschema
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from federation import NS, metadata_schema, one_byte_changed, signxml_verifies
from lxml import etree

from farmkeys.config import PublishConfig
from farmkeys.errors import ConfigError, PublishError
from farmkeys.formats import certificates, signed_xml
from farmkeys.formats.signed_xml import SIGNATURE, element
from farmkeys.publish import (
    CACHE_DURATION,
    PrimaryKey,
    Published,
    PublishedKey,
    metadata,
    primary_key,
    render,
    signed_metadata,
    window,
)

NOW = datetime(2026, 12, 4, 19, 30, tzinfo=UTC)
ENTITY = "https://fs.contoso.example/adfs/services/trust"
SSO = "https://fs.contoso.example/adfs/ls/"
CONFIG = PublishConfig(entity_id=ENTITY, sso_url=SSO)
STORE = Path("/var/lib/farmkeys/store")  # what primary_key names in its errors


def generated(key_type: str, purpose: str = "signing") -> certificates.Generated:
    return certificates.generate(
        farm_name="contoso",
        purpose=purpose,
        key_type=key_type,
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=365),
    )


def published_key(made: certificates.Generated, purpose: str, role: str) -> PublishedKey:
    return PublishedKey(purpose, role, certificates.thumbprint(made.certificate), made.certificate)


@pytest.fixture(scope="module")
def rsa_set() -> tuple[Published, PrimaryKey]:
    primary, secondary = generated("rsa-2048"), generated("rsa-2048")
    decryption = generated("rsa-2048", "decryption")
    keys = Published(
        (
            published_key(primary, "signing", "primary"),
            published_key(secondary, "signing", "secondary"),
        ),
        published_key(decryption, "decryption", "primary"),
    )
    pem = certificates.private_key_pem(primary.key)
    return keys, primary_key(keys, pem, store=STORE)


@pytest.fixture(scope="module")
def ec_set() -> tuple[Published, PrimaryKey]:
    primary = generated("ec-p256")
    keys = Published((published_key(primary, "signing", "primary"),), None)
    return keys, primary_key(keys, certificates.private_key_pem(primary.key), store=STORE)


def pem(key: PrimaryKey) -> bytes:
    return certificates.certificate_pem(key.published.certificate)


def sign(keys: Published, primary: PrimaryKey, *, now: datetime = NOW, **settings: str) -> bytes:
    return signed_metadata(
        keys,
        primary,
        entity_id=settings.get("entity_id", ENTITY),
        sso_url=SSO,
        passive_url=settings.get("passive_url", SSO),
        window=window(now),
    )


# -- the XML writer --------------------------------------------------------------------


TRICKY = 'a & b < c > d " e \t f \n g \r h'


def tree() -> signed_xml.Element:
    """Namespaces declared where the canonical form would not put them (fed on the element
    whose xsi:type names it), nested declarations, and every character c14n escapes."""
    return signed_xml.indented(
        element(
            "md:EntityDescriptor",
            SIGNATURE,
            element(
                "md:RoleDescriptor",
                element(
                    "fed:PassiveRequestorEndpoint",
                    element(
                        "wsa:EndpointReference",
                        element("wsa:Address", TRICKY),
                        namespaces=[("wsa", NS["wsa"])],
                    ),
                ),
                element("md:Empty"),
                attributes=[("xsi:type", "fed:SecurityTokenServiceType"), ("b", TRICKY)],
                namespaces=[("xsi", NS["xsi"]), ("fed", NS["fed"])],
            ),
            attributes=[("entityID", TRICKY), ("ID", "_x"), ("a", "1")],
            namespaces=[("md", NS["md"])],
        )
    )


def without_placeholder(root: signed_xml.Element) -> signed_xml.Element:
    return dataclasses.replace(root, children=tuple(c for c in root.children if c is not SIGNATURE))


def test_the_canonical_form_is_what_lxmls_exclusive_canonicaliser_makes_of_the_document() -> None:
    root = tree()
    written = signed_xml.document(without_placeholder(root))
    parsed = etree.fromstring(written)
    assert etree.tostring(parsed, method="c14n", exclusive=True) == signed_xml.canonical(root)
    # The text and attributes come back as they were put in.
    assert parsed.get("entityID") == TRICKY
    assert parsed.findtext(".//wsa:Address", namespaces=NS) == TRICKY


def test_the_document_is_written_as_c14n_writes_it_but_for_where_namespaces_are_declared() -> None:
    root = without_placeholder(tree())
    written = signed_xml.document(root).decode().split("\n", 1)[1].rstrip("\n")
    canonical = signed_xml.canonical(root).decode()
    assert "/>" not in written and "<md:Empty></md:Empty>" in written
    # c14n declares fed where an element's name uses it, not where xsi:type names it.
    assert canonical.replace(f' xmlns:fed="{NS["fed"]}"', "") == written.replace(
        f' xmlns:fed="{NS["fed"]}"', ""
    )
    assert written.count("xmlns:fed") == 1 and canonical.count("xmlns:fed") == 1
    assert '<fed:PassiveRequestorEndpoint xmlns:fed="' in canonical


def test_text_that_xml_cannot_hold_is_refused_before_anything_is_written() -> None:
    for bad in ("\x00", "\x1b[31m", "\ufffe"):
        with pytest.raises(ValueError, match=r"XML 1\.0"):
            signed_xml.document(element("md:A", bad, namespaces=[("md", NS["md"])]))
    with pytest.raises(ValueError, match="not declared"):
        signed_xml.document(element("md:A"))


def test_an_rsa_signature_verifies_with_signxml_and_a_changed_byte_does_not() -> None:
    made = generated("rsa-2048")
    der = certificates.certificate_der(made.certificate)
    signed = signed_xml.sign_enveloped(tree(), reference="_x", key=made.key, certificate_der=der)
    xml = signed_xml.document(signed)
    certificate = certificates.certificate_pem(made.certificate)
    assert signxml_verifies(xml, certificate)
    assert not signxml_verifies(one_byte_changed(xml, b"a &amp; b", b"a &amp; c"), certificate)
    other = certificates.certificate_pem(generated("rsa-2048").certificate)
    assert not signxml_verifies(xml, other)


def test_an_ecdsa_signature_is_r_and_s_deterministic_and_verifies() -> None:
    made = generated("ec-p256")
    der = certificates.certificate_der(made.certificate)
    signed = signed_xml.sign_enveloped(tree(), reference="_x", key=made.key, certificate_der=der)
    again = signed_xml.sign_enveloped(tree(), reference="_x", key=made.key, certificate_der=der)
    xml = signed_xml.document(signed)
    assert xml == signed_xml.document(again)  # RFC 6979: no random nonce
    assert signxml_verifies(xml, certificates.certificate_pem(made.certificate))
    root = etree.fromstring(xml)
    assert root.find("ds:Signature/ds:SignedInfo/ds:SignatureMethod", NS).get("Algorithm") == (
        "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256"
    )
    value = base64.b64decode(root.findtext("ds:Signature/ds:SignatureValue", namespaces=NS))
    assert len(value) == 64  # r || s, 32 bytes each (XML-DSig 1.1), not DER
    signed_info = root.find("ds:Signature/ds:SignedInfo", NS)
    public = made.certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(
        encode_dss_signature(int.from_bytes(value[:32]), int.from_bytes(value[32:])),
        etree.tostring(signed_info, method="c14n", exclusive=True),
        ec.ECDSA(hashes.SHA256()),
    )


def test_the_signature_needs_a_placeholder_an_xml_id_and_a_known_key() -> None:
    made = generated("rsa-2048")
    der = certificates.certificate_der(made.certificate)
    with pytest.raises(ValueError, match="placeholder"):
        signed_xml.sign_enveloped(
            without_placeholder(tree()), reference="_x", key=made.key, certificate_der=der
        )
    with pytest.raises(ValueError, match="NCName"):
        signed_xml.sign_enveloped(tree(), reference="1 x", key=made.key, certificate_der=der)
    with pytest.raises(ValueError, match="placeholder"):
        signed_xml.document(tree())


# -- the metadata ----------------------------------------------------------------------


def test_the_window_is_the_utc_day_now_is_in() -> None:
    day = datetime(2026, 12, 4, tzinfo=UTC)
    assert window(day).start == day
    assert window(day + timedelta(hours=23, minutes=59, seconds=59)).start == day
    assert window(day - timedelta(microseconds=1)).start == day - timedelta(days=1)
    assert window(day).valid_until == datetime(2026, 12, 11, tzinfo=UTC)
    with pytest.raises(ValueError, match="aware"):
        window(datetime(2026, 12, 4))


def test_the_document_carries_its_id_validity_and_cache_duration_and_signs_itself(
    rsa_set: tuple[Published, PrimaryKey],
) -> None:
    keys, primary = rsa_set
    xml = sign(keys, primary)
    root = etree.fromstring(xml)
    assert root.get("validUntil") == "2026-12-11T00:00:00Z"
    assert root.get("cacheDuration") == CACHE_DURATION == "PT1H"
    assert root.get("entityID") == ENTITY
    reference = root.find("ds:Signature/ds:SignedInfo/ds:Reference", NS)
    assert reference.get("URI") == "#" + root.get("ID")
    assert [t.get("Algorithm") for t in reference.iterfind("ds:Transforms/ds:Transform", NS)] == [
        "http://www.w3.org/2000/09/xmldsig#enveloped-signature",
        "http://www.w3.org/2001/10/xml-exc-c14n#",
    ]
    (certificate,) = root.findall("ds:Signature/ds:KeyInfo/ds:X509Data/ds:X509Certificate", NS)
    assert base64.b64decode(certificate.text) == primary.published.der
    assert signxml_verifies(xml, pem(primary))
    secondary = certificates.certificate_pem(keys.signing[1].certificate)
    assert not signxml_verifies(xml, secondary)


def test_the_same_set_and_day_give_the_same_bytes_and_the_next_day_new_ones(
    rsa_set: tuple[Published, PrimaryKey], ec_set: tuple[Published, PrimaryKey]
) -> None:
    for keys, primary in (rsa_set, ec_set):
        morning = sign(keys, primary, now=NOW.replace(hour=0, minute=0))
        assert sign(keys, primary, now=NOW.replace(hour=23, minute=59)) == morning
        tomorrow = sign(keys, primary, now=NOW + timedelta(days=1))
        assert tomorrow != morning
        assert etree.fromstring(tomorrow).get("validUntil") == "2026-12-12T00:00:00Z"
        assert etree.fromstring(tomorrow).get("ID") != etree.fromstring(morning).get("ID")
        assert signxml_verifies(tomorrow, pem(primary))


def test_the_ec_p256_document_is_signed_with_ecdsa_sha256(
    ec_set: tuple[Published, PrimaryKey],
) -> None:
    keys, primary = ec_set
    xml = sign(keys, primary)
    method = etree.fromstring(xml).find("ds:Signature/ds:SignedInfo/ds:SignatureMethod", NS)
    assert method.get("Algorithm") == "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256"
    assert signxml_verifies(xml, pem(primary))


def test_the_ws_federation_role_has_the_shape_of_the_ws_federation_schema(
    rsa_set: tuple[Published, PrimaryKey],
) -> None:
    keys, primary = rsa_set
    passive = "https://fs.contoso.example/adfs/ls/wsfed"
    xml = sign(keys, primary, passive_url=passive)
    metadata_schema().validate(xml)
    root = etree.fromstring(xml)
    names = [etree.QName(child).localname for child in root]
    assert names == ["Signature", "RoleDescriptor", "IDPSSODescriptor"]  # AD FS's order
    role = root.find("md:RoleDescriptor", NS)
    assert role.get(f"{{{NS['xsi']}}}type") == "fed:SecurityTokenServiceType"
    assert role.nsmap["fed"] == NS["fed"]  # the prefix xsi:type names is declared there
    assert role.get("protocolSupportEnumeration") == NS["fed"]
    assert [etree.QName(child).text for child in role] == [
        *[f"{{{NS['md']}}}KeyDescriptor"] * 2,
        f"{{{NS['fed']}}}SecurityTokenServiceEndpoint",
        f"{{{NS['fed']}}}PassiveRequestorEndpoint",
    ]
    for endpoint in role.iterfind("fed:*", NS):
        assert endpoint.findtext("wsa:EndpointReference/wsa:Address", namespaces=NS) == passive
    # The same signing KeyDescriptors as the IDPSSODescriptor's, the encryption key apart.
    signing = [
        etree.tostring(kd, method="c14n", exclusive=True)
        for kd in root.iterfind("md:IDPSSODescriptor/md:KeyDescriptor[@use='signing']", NS)
    ]
    assert [etree.tostring(kd, method="c14n", exclusive=True) for kd in role][:2] == signing


def test_the_schema_check_is_real_a_role_out_of_order_fails_it(
    rsa_set: tuple[Published, PrimaryKey],
) -> None:
    keys, primary = rsa_set
    text = sign(keys, primary).decode()
    sts, passive = "    <fed:SecurityTokenServiceEndpoint>", "    <fed:PassiveRequestorEndpoint>"
    end = "  </md:RoleDescriptor>"
    a, b, c = text.index(sts), text.index(passive), text.index(end)
    swapped = text[:a] + text[b:c] + text[a:b] + text[c:]
    with pytest.raises(xmlschema.XMLSchemaValidationError):
        metadata_schema().validate(swapped)
    without_sts = text[:a] + text[b:]
    with pytest.raises(xmlschema.XMLSchemaValidationError):
        metadata_schema().validate(without_sts)


def test_passive_url_defaults_to_the_sso_url(rsa_set: tuple[Published, PrimaryKey]) -> None:
    keys, primary = rsa_set
    xml = render(CONFIG, keys, primary, now=NOW)
    root = etree.fromstring(xml)
    addresses = {a.text for a in root.iterfind(".//wsa:Address", NS)}
    assert addresses == {SSO}
    config = dataclasses.replace(CONFIG, passive_url="https://fs.contoso.example/wsfed")
    root = etree.fromstring(render(config, keys, primary, now=NOW))
    assert {a.text for a in root.iterfind(".//wsa:Address", NS)} == {
        "https://fs.contoso.example/wsfed"
    }


def test_sign_metadata_false_gives_the_unsigned_document_byte_for_byte(
    rsa_set: tuple[Published, PrimaryKey],
) -> None:
    keys, _ = rsa_set
    unsigned = dataclasses.replace(CONFIG, sign_metadata=False)
    xml = render(unsigned, keys, None, now=NOW)
    assert xml == metadata(keys, entity_id=ENTITY, sso_url=SSO)

    def descriptor(use: str, key: PublishedKey) -> list[str]:
        b64 = base64.b64encode(key.der).decode()
        return [
            f'    <md:KeyDescriptor use="{use}">',
            "      <ds:KeyInfo>",
            f"        <ds:KeyName>{key.thumbprint}</ds:KeyName>",
            f"        <ds:X509Data><ds:X509Certificate>{b64}</ds:X509Certificate></ds:X509Data>",
            "      </ds:KeyInfo>",
            "    </md:KeyDescriptor>",
        ]

    assert keys.encryption is not None
    expected = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata"'
        ' xmlns:ds="http://www.w3.org/2000/09/xmldsig#"'
        ' entityID="https://fs.contoso.example/adfs/services/trust">',
        '  <md:IDPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">',
        *descriptor("signing", keys.signing[0]),
        *descriptor("signing", keys.signing[1]),
        *descriptor("encryption", keys.encryption),
        '    <md:SingleSignOnService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect"'
        ' Location="https://fs.contoso.example/adfs/ls/"/>',
        '    <md:SingleSignOnService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"'
        ' Location="https://fs.contoso.example/adfs/ls/"/>',
        "  </md:IDPSSODescriptor>",
        "</md:EntityDescriptor>",
        "",
    ]
    assert xml.decode() == "\n".join(expected)
    with pytest.raises(ValueError, match="signing primary"):
        render(CONFIG, keys, None, now=NOW)


def test_the_primary_key_must_be_the_certificates_and_never_shows_in_an_error(
    rsa_set: tuple[Published, PrimaryKey],
) -> None:
    keys, primary = rsa_set
    assert repr(primary) == f"PrimaryKey({primary.published.thumbprint})"
    other = certificates.private_key_pem(rsa.generate_private_key(65537, 2048))
    with pytest.raises(PublishError, match="is not the key of its certificate") as mismatch:
        primary_key(keys, other, store=STORE)
    with pytest.raises(PublishError, match="is not an unencrypted PKCS#8 key") as damaged:
        primary_key(keys, other[:-40] + b"\n-----END PRIVATE KEY-----\n", store=STORE)
    body = b"".join(other.splitlines()[1:-1]).decode()
    for error in (mismatch.value, damaged.value):
        assert body[:24] not in error.diagnostics()
        assert "PRIVATE" not in error.diagnostics()
    no_primary = Published(keys.signing[1:], keys.encryption)
    with pytest.raises(PublishError, match="has no signing primary"):
        primary_key(no_primary, other, store=STORE)


def test_a_node_without_deterministic_ecdsa_says_so_in_one_line(
    ec_set: tuple[Published, PrimaryKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys, primary = ec_set

    def unsupported(*args: object, **kwargs: object) -> None:
        raise UnsupportedAlgorithm("ECDSA deterministic signing is not supported")

    monkeypatch.setattr(signed_xml, "sign_enveloped", unsupported)
    with pytest.raises(PublishError, match="deterministic ECDSA") as refused:
        sign(keys, primary)
    assert "sign_metadata = false" in refused.value.todo


def test_an_entity_id_xml_cannot_hold_is_one_clear_error(
    rsa_set: tuple[Published, PrimaryKey],
) -> None:
    keys, primary = rsa_set
    with pytest.raises(ConfigError, match="holds a character XML cannot hold") as refused:
        sign(keys, primary, entity_id="urn:x\x00y")
    assert "\\x00" in refused.value.what  # shown escaped, never raw
