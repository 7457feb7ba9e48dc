"""The SAML 2.0 IdP metadata document, as AD FS serves it at
``/FederationMetadata/2007-06/FederationMetadata.xml``.

Deterministic: the same keys and settings give the same bytes on every node.
"""

from __future__ import annotations

import base64
from typing import Final
from xml.sax.saxutils import quoteattr

from farmkeys.config import PublishConfig
from farmkeys.errors import ConfigError
from farmkeys.publish.keys import Published

_MD: Final = "urn:oasis:names:tc:SAML:2.0:metadata"
_DS: Final = "http://www.w3.org/2000/09/xmldsig#"
_PROTOCOL: Final = "urn:oasis:names:tc:SAML:2.0:protocol"
_BINDINGS: Final = (
    "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect",
    "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST",
)


def metadata(keys: Published, *, entity_id: str, sso_url: str) -> bytes:
    """SAML 2.0 IdP metadata: an ``EntityDescriptor`` with one ``IDPSSODescriptor``.

    Deterministic: the same keys and settings give the same bytes on every node.
    """
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<md:EntityDescriptor xmlns:md="{_MD}" xmlns:ds="{_DS}" entityID={quoteattr(entity_id)}>',
        f'  <md:IDPSSODescriptor protocolSupportEnumeration="{_PROTOCOL}">',
    ]
    uses = [("signing", key) for key in keys.signing]
    if keys.encryption is not None:
        uses.append(("encryption", keys.encryption))
    for use, key in uses:
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
