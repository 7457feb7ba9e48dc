"""The directory settings' checks, without ldap3: `farmkeys sync` checks them at start even
when it turns out to need no directory request (and so never loads ldap3)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from urllib.parse import urlsplit

from farmkeys.config import DirectoryConfig
from farmkeys.directory.ad import AD
from farmkeys.directory.layout import Layout
from farmkeys.directory.openldap import OPENLDAP
from farmkeys.errors import ConfigError

LAYOUT_BY_NAME: dict[str, Layout] = {OPENLDAP.name: OPENLDAP, AD.name: AD}

UPN = re.compile(r"^[^@=,\s]+@[^@=,\s]+$")
"""A user principal name (``svc-farm@example.com``), which Active Directory binds by too."""


def is_ldaps(url: str) -> bool:
    """Whether ``url`` is an ``ldaps://`` URL (TLS from the first byte)."""
    return urlsplit(url).scheme == "ldaps"


def _validate_url(url: str, config: DirectoryConfig) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
        raise ConfigError(
            f"directory.url {url!r} is not an ldap:// or ldaps:// URL with a host",
            "write it as ldap://host[:port] or ldaps://host[:port]",
        )
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(
            f"directory.url {url!r} has an invalid port",
            "write it as ldap://host[:port] or ldaps://host[:port]",
        ) from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(
            f"directory.url {url!r} has a path, query or fragment",
            "give only the scheme, host and port; the DNs are separate settings",
        )
    if config.start_tls and parts.scheme == "ldaps":
        raise ConfigError(
            "directory.start_tls is set with an ldaps:// URL",
            "use either ldaps:// or ldap:// with start_tls = true, not both",
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (``localhost`` or a loopback address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# An attribute type (a name or an OID), "=", then anything, for each RDN of a DN; commas
# escaped with a backslash belong to a value. ldap3's parser checks fully when the directory
# is made (farmkeys.directory.connection.parses_as_dn).
_RDN = re.compile(r"^\s*(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)\s*=")


def looks_like_dn(dn: str) -> bool:
    """Whether each comma-separated part of ``dn`` starts as an RDN does (``type=``)."""
    return all(_RDN.match(part) for part in re.split(r"(?<!\\),", dn))


def validate(config: DirectoryConfig, *, is_dn: Callable[[str], bool] = looks_like_dn) -> Layout:
    """Check the directory settings; their layout. ``is_dn`` judges a distinguished name."""

    layout = LAYOUT_BY_NAME.get(config.layout)
    if layout is None:
        raise ConfigError(
            f"directory.layout {config.layout!r} is not a known layout",
            f"use one of: {', '.join(LAYOUT_BY_NAME)}",
        )
    for url in config.urls:
        _validate_url(url, config)
    if layout.requires_tls and not (config.start_tls or all(is_ldaps(u) for u in config.urls)):
        raise ConfigError(
            f"directory.layout {layout.name!r} needs TLS: Active Directory refuses a "
            "simple bind in clear text",
            "use ldaps:// URLs, or ldap:// URLs with start_tls = true, and set directory.ca_file",
        )
    plaintext = [
        u for u in config.urls if not is_ldaps(u) and not is_loopback(urlsplit(u).hostname or "")
    ]
    if plaintext and not config.start_tls and not config.allow_plaintext:
        raise ConfigError(
            f"directory.url {plaintext[0]} is reached without TLS: the bind password and "
            "the master keys would cross the network in the clear",
            "use ldaps://, or set start_tls = true with ca_file; only on a network you "
            "trust, set allow_plaintext = true",
        )
    if config.start_tls and not config.ca_file:
        raise ConfigError(
            "directory.start_tls is set but directory.ca_file is not",
            "set directory.ca_file to the CA certificate (PEM) that issued "
            "the directory server's certificate",
        )
    for setting, dn in (("bind_dn", config.bind_dn), ("container", config.container)):
        if setting == "bind_dn" and layout is AD and UPN.match(dn):
            continue  # Active Directory also binds by userPrincipalName
        if not (dn.strip() and is_dn(dn)):
            upn = " or a user principal name (svc-farm@example.com)" if layout is AD else ""
            raise ConfigError(
                f"directory.{setting} {dn!r} is not a distinguished name{upn}",
                "write it as an LDAP DN, e.g. cn=svc-farm,ou=people,dc=example,dc=com",
            )
    if config.password is None and config.password_file is None:
        raise ConfigError(
            "neither directory.password nor directory.password_file is set",
            "set directory.password_file to a file holding the service account's password",
        )
    if config.password is not None and not config.password:
        raise ConfigError(
            "directory.password is empty (an empty simple bind is anonymous)",
            "set the service account's password, or use directory.password_file",
        )
    if config.timeout_seconds <= 0:
        raise ConfigError(
            f"directory.timeout_seconds is {config.timeout_seconds}",
            "set it to a positive number of seconds",
        )
    return layout
