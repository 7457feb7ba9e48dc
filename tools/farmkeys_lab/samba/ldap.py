"""LDAP to the lab DC: a bound ldap3 connection, always over verified TLS, and SIDs as text."""

from __future__ import annotations

import ssl
import struct
from pathlib import Path

import ldap3


def tls_for(ca_file: Path) -> ldap3.Tls:
    """ldap3 TLS settings that verify the server's certificate and name against ``ca_file``."""
    return ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca_file))


def connect(
    url: str,
    user: str,
    password: str,
    ca_file: Path,
    *,
    start_tls: bool = False,
    timeout: int = 5,
) -> ldap3.Connection:
    """An ldap3 connection bound as ``user`` (a DN or a UPN): ldaps, or ldap + StartTLS.

    The server's certificate is always verified with ``ca_file``. Raises
    ldap3's exceptions on any failure (refused bind, bad certificate).
    """
    server = ldap3.Server(url, tls=tls_for(ca_file), get_info=ldap3.NONE, connect_timeout=timeout)
    return ldap3.Connection(
        server,
        user=user,
        password=password,
        auto_bind=ldap3.AUTO_BIND_TLS_BEFORE_BIND if start_tls else ldap3.AUTO_BIND_NO_TLS,
        raise_exceptions=True,
        receive_timeout=timeout,
    )


def sid_text(raw: bytes) -> str:
    """A binary ``objectSid`` as ``S-1-5-21-…``."""
    revision, count = raw[0], raw[1]
    authority = int.from_bytes(raw[2:8], "big")
    subs = struct.unpack(f"<{count}I", raw[8 : 8 + 4 * count])
    return "S-" + "-".join(str(part) for part in (revision, authority, *subs))
