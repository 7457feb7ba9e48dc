"""A relying party's checks of the federation metadata, with tools that are not farmkeys':
the schemas (SAML 2.0 metadata and xmldsig as pysaml2 ships them, WS-Federation 1.2 and
WS-Addressing from tests/support/schemas/), and the signature verified by xmlsec1 (Debian's
``xmlsec1``, installed by `make setup`) and by signxml.

tests/support/schemas/ holds the OASIS ``ws-federation.xsd`` of WS-Federation 1.2 (as
published, with its notice) and the W3C ``ws-addr.xsd`` (from Debian's shibboleth-sp-common).
The federation schema imports five more (WS-Security secext and utility, WS-MetadataExchange,
WS-SecurityPolicy, WS-Authorization); they are not here, so the schema is built in lax mode
and :func:`metadata_schema` checks that those five, and only those, are what is missing:
none of their elements or types is in what farmkeys writes, and an element of theirs in a
document would be checked only laxly.
"""

from __future__ import annotations

import functools
import subprocess
import tempfile
import warnings
from importlib.resources import files
from pathlib import Path

import saml2.data.schemas
import xmlschema
from signxml import XMLVerifier
from signxml.exceptions import InvalidInput, InvalidSignature

SCHEMAS = Path(__file__).resolve().parent / "schemas"
MD = "urn:oasis:names:tc:SAML:2.0:metadata"
DS = "http://www.w3.org/2000/09/xmldsig#"
FED = "http://docs.oasis-open.org/wsfed/federation/200706"
WSA = "http://www.w3.org/2005/08/addressing"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
NS = {"md": MD, "ds": DS, "fed": FED, "wsa": WSA, "xsi": XSI}

# What ws-federation.xsd imports that is not in tests/support/schemas/.
NOT_HERE = {
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd",
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd",
    "http://schemas.xmlsoap.org/ws/2004/09/mex",
    "http://docs.oasis-open.org/ws-sx/ws-securitypolicy/200702",
    "http://docs.oasis-open.org/wsfed/authorization/200706",
}


@functools.cache
def metadata_schema() -> xmlschema.XMLSchema:
    """SAML 2.0 metadata with xmldsig and xmlenc (pysaml2's files), WS-Federation 1.2 and
    WS-Addressing: a validator of the whole federation metadata document. Local files only."""
    bundled = files(saml2.data.schemas)
    metadata = str(bundled.joinpath("saml-schema-metadata-2.0.xsd"))
    locations = {
        "http://www.w3.org/XML/1998/namespace": str(bundled.joinpath("xml.xsd")),
        DS: str(bundled.joinpath("xmldsig-core-schema.xsd")),
        "http://www.w3.org/2001/04/xmlenc#": str(bundled.joinpath("xenc-schema.xsd")),
        "urn:oasis:names:tc:SAML:2.0:assertion": str(
            bundled.joinpath("saml-schema-assertion-2.0.xsd")
        ),
        MD: metadata,
        FED: str(SCHEMAS / "ws-federation.xsd"),
        WSA: str(SCHEMAS / "ws-addr.xsd"),
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schema = xmlschema.XMLSchema(
            metadata, locations=locations, validation="lax", allow="local", base_url=metadata
        )
    missing = {
        namespace
        for warning in caught
        for namespace in NOT_HERE | set(locations)
        if f"Import of namespace '{namespace}'" in str(warning.message)
    }
    assert missing == NOT_HERE, f"schemas not loaded: {missing ^ NOT_HERE}"
    assert not schema.all_errors, schema.all_errors
    assert {FED, WSA, MD, DS} <= set(schema.maps.namespaces)
    return schema


def xmlsec1_verifies(xml: bytes, certificate_pem: bytes) -> bool:
    """Whether ``xmlsec1 --verify`` accepts the enveloped signature of ``xml`` with the key
    of ``certificate_pem``, the ``ID`` attribute of ``md:EntityDescriptor`` as its ID."""
    with tempfile.TemporaryDirectory(prefix="farmkeys-xmlsec1-") as folder:
        document, certificate = Path(folder, "metadata.xml"), Path(folder, "signing.pem")
        document.write_bytes(xml)
        certificate.write_bytes(certificate_pem)
        result = subprocess.run(
            [
                "xmlsec1",
                "--verify",
                "--pubkey-cert-pem",
                str(certificate),
                "--id-attr:ID",
                f"{MD}:EntityDescriptor",
                str(document),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    # xmlsec1 prints "OK" and exits 0 only when the signature and its reference verify.
    return result.returncode == 0 and "OK" in result.stderr.splitlines()


def signxml_verifies(xml: bytes, certificate_pem: bytes) -> bool:
    """Whether signxml's verifier accepts the enveloped signature of ``xml`` with
    ``certificate_pem`` (and finds it signs the whole ``md:EntityDescriptor``)."""
    try:
        result = XMLVerifier().verify(xml, x509_cert=certificate_pem.decode("ascii"))
    except (InvalidSignature, InvalidInput):
        return False
    signed = result.signed_xml
    assert signed is not None and signed.tag == f"{{{MD}}}EntityDescriptor"
    return True


def one_byte_changed(xml: bytes, old: bytes, new: bytes) -> bytes:
    """``xml`` with the first ``old`` after the signature made ``new``, which differs from it
    in one byte: a change in the signed content that a parser still reads."""
    assert len(old) == len(new) and sum(a != b for a, b in zip(old, new, strict=True)) == 1
    at = xml.index(old, xml.index(b"</ds:Signature>"))
    return xml[:at] + new + xml[at + len(old) :]
