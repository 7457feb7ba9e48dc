"""The federation metadata, as AD FS serves it at
``/FederationMetadata/2007-06/FederationMetadata.xml``: SAML 2.0 IdP metadata with
AD FS's WS-Federation role, signed with the installed signing primary.

The signed document ([publish] sign_metadata = true, the default), element by element::

    md:EntityDescriptor  ID, cacheDuration, entityID, validUntil
      ds:Signature                    enveloped, over the EntityDescriptor (#ID)
      md:RoleDescriptor xsi:type="fed:SecurityTokenServiceType"
                        protocolSupportEnumeration="<WS-Federation 200706>"
        md:KeyDescriptor use="signing"       one per signing key, as in the IDPSSODescriptor
        fed:SecurityTokenServiceEndpoint     wsa:EndpointReference/wsa:Address: passive_url
        fed:PassiveRequestorEndpoint         wsa:EndpointReference/wsa:Address: passive_url
      md:IDPSSODescriptor
        md:KeyDescriptor use="signing"       primary, secondary, retired (keys.py)
        md:KeyDescriptor use="encryption"    the primary decryption certificate
        md:SingleSignOnService               HTTP-Redirect and HTTP-POST: sso_url

The WS-Federation role has the shape of AD FS's and Entra ID's (WS-Federation 1.2,
ws-federation.xsd, section 3.1.2.2): the RoleDescriptor comes before the
IDPSSODescriptor, its KeyDescriptors first, then the endpoints in the schema's order. The
schema requires at least one ``SecurityTokenServiceEndpoint``; farmkeys runs no WS-Trust
endpoint of its own, so, as Entra ID does, it names the passive endpoint there too. The
optional ``TokenTypesOffered`` and ``ClaimTypesOffered`` are left out: they describe the
federation service's tokens, which farmkeys does not know.

**Validity.** The document is signed for a window: each UTC day (:data:`WINDOW`) is one
window, and its document says ``validUntil`` = the window's start + :data:`VALID_FOR`
(7 days: a relying party that cannot reach the farm keeps trusting the last document it
fetched for six to seven days, and a captured document is refused at the latest a week
after its window began) and ``cacheDuration`` = :data:`CACHE_DURATION` (an hour: how often
a relying party should fetch it again, far inside the five days a secondary is published
before its promotion). Nothing else in the document depends on the clock.

**Determinism.** The same installed set, settings and window give the same bytes on every
node: the ID is the SHA-256 of the canonical document without it, the window comes from the
clock rounded down to the day, and the signature is deterministic (RSA PKCS#1 v1.5, or ECDSA
with RFC 6979 nonces: :mod:`farmkeys.formats.signed_xml`). So the ETag matches across
nodes, and changes once a day, when the window turns, or when the set changes.

With sign_metadata = false the document is the unsigned one (:func:`metadata`) farmkeys
published before, byte for byte: no ID, validUntil, signature or WS-Federation role.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Final
from xml.sax.saxutils import quoteattr

from cryptography.exceptions import UnsupportedAlgorithm

from farmkeys.config import PublishConfig
from farmkeys.errors import ConfigError, PublishError
from farmkeys.formats import signed_xml
from farmkeys.formats.signed_xml import SIGNATURE, Element, element
from farmkeys.publish.keys import (
    PrimaryKey,
    Published,
    PublishedKey,
    from_store,
    signing_from_store,
)
from farmkeys.store import Store

_MD: Final = "urn:oasis:names:tc:SAML:2.0:metadata"
_DS: Final = "http://www.w3.org/2000/09/xmldsig#"
_XSI: Final = "http://www.w3.org/2001/XMLSchema-instance"
_FED: Final = "http://docs.oasis-open.org/wsfed/federation/200706"
_WSA: Final = "http://www.w3.org/2005/08/addressing"
_PROTOCOL: Final = "urn:oasis:names:tc:SAML:2.0:protocol"
_BINDINGS: Final = (
    "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect",
    "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST",
)

WINDOW: Final = timedelta(days=1)
"""The signed document is made again when the clock enters the next window (UTC days)."""
VALID_FOR: Final = timedelta(days=7)
"""``validUntil``: the start of the document's window plus this."""
CACHE_DURATION: Final = "PT1H"
"""``cacheDuration``: how long a relying party may keep the document before fetching it."""


@dataclass(frozen=True)
class Window:
    """The validity window a signed document is made for: it starts at ``start``."""

    start: datetime

    @property
    def valid_until(self) -> datetime:
        return self.start + VALID_FOR


def window(now: datetime) -> Window:
    """The window ``now`` (an aware datetime) falls in: ``now`` rounded down to the day, UTC."""
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    step = int(WINDOW.total_seconds())
    start = int(now.timestamp()) // step * step
    return Window(datetime.fromtimestamp(start, UTC))


def metadata(keys: Published, *, entity_id: str, sso_url: str) -> bytes:
    """The unsigned SAML 2.0 IdP metadata ([publish] sign_metadata = false): an
    ``EntityDescriptor`` with one ``IDPSSODescriptor``.

    Deterministic: the same keys and settings give the same bytes on every node.
    """
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<md:EntityDescriptor xmlns:md="{_MD}" xmlns:ds="{_DS}" entityID={quoteattr(entity_id)}>',
        f'  <md:IDPSSODescriptor protocolSupportEnumeration="{_PROTOCOL}">',
    ]
    for use, key in _uses(keys):
        certificate = base64.b64encode(key.der).decode("ascii")
        lines += [
            f'    <md:KeyDescriptor use="{use}">',
            "      <ds:KeyInfo>",
            f"        <ds:KeyName>{key.thumbprint}</ds:KeyName>",
            f"        <ds:X509Data><ds:X509Certificate>{certificate}</ds:X509Certificate>"
            "</ds:X509Data>",
            "      </ds:KeyInfo>",
            "    </md:KeyDescriptor>",
        ]
    lines += [
        f'    <md:SingleSignOnService Binding="{binding}" Location={quoteattr(sso_url)}/>'
        for binding in _BINDINGS
    ]
    lines += ["  </md:IDPSSODescriptor>", "</md:EntityDescriptor>", ""]
    return "\n".join(lines).encode("utf-8")


def signed_metadata(
    keys: Published,
    primary: PrimaryKey,
    *,
    entity_id: str,
    sso_url: str,
    passive_url: str,
    window: Window,
) -> bytes:
    """The signed federation metadata (see the module docstring) of ``keys``, signed with
    ``primary`` for ``window``. Deterministic: the same arguments give the same bytes."""
    signing = [_key_descriptor("signing", key) for key in keys.signing]
    role = element(
        "md:RoleDescriptor",
        *signing,
        _endpoint("fed:SecurityTokenServiceEndpoint", passive_url),
        _endpoint("fed:PassiveRequestorEndpoint", passive_url),
        attributes=[
            ("xsi:type", "fed:SecurityTokenServiceType"),
            ("protocolSupportEnumeration", _FED),
        ],
        namespaces=[("xsi", _XSI), ("fed", _FED)],
    )
    idp = element(
        "md:IDPSSODescriptor",
        *(_key_descriptor(use, key) for use, key in _uses(keys)),
        *(
            element(
                "md:SingleSignOnService", attributes=[("Binding", binding), ("Location", sso_url)]
            )
            for binding in _BINDINGS
        ),
        attributes=[("protocolSupportEnumeration", _PROTOCOL)],
    )
    for name, value in (
        ("entity ID", entity_id),
        ("SSO URL", sso_url),
        ("passive URL", passive_url),
    ):
        if not signed_xml.holds_xml(value):
            raise ConfigError(
                f"the {name} {value!r} holds a character XML cannot hold",
                "correct it in [publish] or on the command line",
            )
    valid_until = window.valid_until.strftime("%Y-%m-%dT%H:%M:%SZ")
    attributes = [
        ("entityID", entity_id),
        ("validUntil", valid_until),
        ("cacheDuration", CACHE_DURATION),
    ]
    unnamed = signed_xml.indented(
        Element("md:EntityDescriptor", tuple(attributes), (SIGNATURE, role, idp), (("md", _MD),))
    )
    # The ID names this document's content: the digest of its canonical form without it.
    reference = "_" + hashlib.sha256(signed_xml.canonical(unnamed)).hexdigest()[:40]
    root = replace(unnamed, attributes=(("ID", reference), *unnamed.attributes))
    try:
        signed = signed_xml.sign_enveloped(
            root,
            reference=reference,
            key=primary.private_key,
            certificate_der=primary.published.der,
        )
    except UnsupportedAlgorithm:
        raise PublishError(
            "this node's cryptography cannot make deterministic ECDSA signatures (RFC 6979),"
            " which sign an EC farm's metadata",
            "install farmkeys with cryptography's own wheel (its OpenSSL has them from 3.2),"
            " or set publish.sign_metadata = false",
        ) from None
    return signed_xml.document(signed)


def render(
    config: PublishConfig,
    keys: Published,
    primary: PrimaryKey | None,
    *,
    now: datetime,
    entity_id: str | None = None,
    sso_url: str | None = None,
) -> bytes:
    """The metadata ``config`` asks for: signed with ``primary`` for the window of ``now``
    (``sign_metadata``), else unsigned; the entity ID and SSO URL as
    :func:`metadata_settings` gives them. ``primary`` may be None only when unsigned."""
    entity_id, sso_url = metadata_settings(config, entity_id=entity_id, sso_url=sso_url)
    if not config.sign_metadata:
        return metadata(keys, entity_id=entity_id, sso_url=sso_url)
    if primary is None:
        raise ValueError("signed metadata needs the signing primary's key")
    return signed_metadata(
        keys,
        primary,
        entity_id=entity_id,
        sso_url=sso_url,
        passive_url=config.passive_url or sso_url,
        window=window(now),
    )


def metadata_of_store(
    config: PublishConfig,
    store: Store,
    *,
    now: datetime,
    entity_id: str | None = None,
    sso_url: str | None = None,
) -> bytes:
    """The metadata of the set installed in ``store`` at ``now``, as serve answers it (what
    `farmkeys metadata` prints): :class:`ConfigError` without an entity ID or SSO URL,
    :class:`~farmkeys.errors.PublishError` when nothing is installed."""
    metadata_settings(config, entity_id=entity_id, sso_url=sso_url)  # that error first
    if config.sign_metadata:
        _, keys, primary = signing_from_store(store, now=now)
        return render(config, keys, primary, now=now, entity_id=entity_id, sso_url=sso_url)
    keys = from_store(store, now=now)
    return render(config, keys, None, now=now, entity_id=entity_id, sso_url=sso_url)


def metadata_settings(
    config: PublishConfig, *, entity_id: str | None = None, sso_url: str | None = None
) -> tuple[str, str]:
    """The entity ID and SSO URL (arguments first, then ``[publish]``); a
    :class:`ConfigError` naming what is missing."""
    entity_id = entity_id or config.entity_id
    sso_url = sso_url or config.sso_url
    if not entity_id or not sso_url:
        missing = " and ".join(
            name for name, v in (("entity_id", entity_id), ("sso_url", sso_url)) if not v
        )
        raise ConfigError(
            f"publish.{missing.replace(' and ', ' and publish.')} is not set",
            "set it in [publish] (or pass --entity-id / --sso-url to `farmkeys metadata`)",
        )
    return entity_id, sso_url


def _uses(keys: Published) -> list[tuple[str, PublishedKey]]:
    """(use, key) of each KeyDescriptor of the IDPSSODescriptor, in order."""
    uses = [("signing", key) for key in keys.signing]
    if keys.encryption is not None:
        uses.append(("encryption", keys.encryption))
    return uses


def _key_descriptor(use: str, key: PublishedKey) -> Element:
    certificate = base64.b64encode(key.der).decode("ascii")
    return element(
        "md:KeyDescriptor",
        element(
            "ds:KeyInfo",
            element("ds:KeyName", key.thumbprint),
            element("ds:X509Data", element("ds:X509Certificate", certificate)),
            namespaces=[("ds", _DS)],
        ),
        attributes=[("use", use)],
    )


def _endpoint(name: str, address: str) -> Element:
    return element(
        name,
        element(
            "wsa:EndpointReference",
            element("wsa:Address", address),
            namespaces=[("wsa", _WSA)],
        ),
    )
