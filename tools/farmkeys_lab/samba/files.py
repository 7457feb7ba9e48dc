"""What the lab DC reads from disk: its TLS files, its smb.conf, and private files."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import stat
from pathlib import Path

from cryptography import x509

from farmkeys_lab import tls
from farmkeys_lab.samba.domain import DOMAIN, HOST_NAME, REALM
from farmkeys_lab.servers import LOOPBACK


def write_ca_certificate(path: Path, common_name: str = "farmkeys lab: an unrelated CA") -> Path:
    """Write a fresh self-signed CA certificate (PEM) to ``path``, its key discarded.

    For tests that need a CA which did not issue the DC's certificate.
    """
    return tls.write_pem(Path(path), tls.new_ca(common_name)[1])


def write_tls(directory: Path) -> None:
    """A CA, and a server certificate it issued for 127.0.0.1 and localhost, into ``directory``.

    ``ca.pem``, ``cert.pem`` and ``key.pem`` (0600: Samba refuses a key others can read).
    The CA's key is not kept.
    """
    authority = tls.new_ca(f"farmkeys lab CA {secrets.token_hex(4)}")
    names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
        x509.DNSName("localhost"),
    ]
    key, certificate = tls.issue_server(authority, names)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in ("ca.pem", "cert.pem", "key.pem"):
        (directory / stale).unlink(missing_ok=True)
    tls.write_pem(directory / "ca.pem", authority[1])
    tls.write_pem(directory / "cert.pem", certificate)
    tls.write_key(directory / "key.pem", key)


def write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_smb_conf(domain_dir: Path, *, into: Path | None = None) -> Path:
    """The DC's smb.conf, every path inside ``domain_dir`` (none in /run, /var or /etc).

    Written into ``into`` (default: ``domain_dir``), a copy to be renamed ``domain_dir``.
    """
    d = domain_dir
    target = into or domain_dir
    tls = d / "private" / "tls"
    settings = {
        "netbios name": HOST_NAME.upper(),
        "realm": REALM,
        "workgroup": DOMAIN,
        "server role": "active directory domain controller",
        "server services": "ldap",
        "interfaces": LOOPBACK,
        "bind interfaces only": "yes",
        "idmap_ldb:use rfc2307": "yes",
        "private dir": d / "private",
        "lock directory": d,
        "state directory": d / "state",
        "cache directory": d / "cache",
        "binddns dir": d / "bind-dns",
        "pid directory": d / "run",
        "ncalrpc dir": d / "run" / "ncalrpc",
        "ntp signd socket directory": d / "run" / "ntp_signd",
        "winbindd socket directory": d / "run" / "winbindd",
        "log file": d / "samba.log",  # unused in the foreground (-i logs to stdout)
        "tls enabled": "yes",
        "tls keyfile": tls / "key.pem",
        "tls certfile": tls / "cert.pem",
        "tls cafile": tls / "ca.pem",
    }
    for directory in ("run", "cache", "etc"):
        (target / directory).mkdir(exist_ok=True)
    text = (
        "# Written by farmkeys_lab.samba; a disposable test domain controller.\n[global]\n"
        + "".join(f"\t{name} = {value}\n" for name, value in settings.items())
    )
    path = target / "etc" / "smb.conf"
    path.write_text(text, encoding="utf-8")
    return path


def copy_ignoring_sockets(directory: str, names: list[str]) -> set[str]:
    """shutil.copytree's ``ignore``: the sockets and FIFOs a running samba left behind."""
    ignored: set[str] = set()
    for name in names:
        with contextlib.suppress(OSError):
            mode = os.lstat(os.path.join(directory, name)).st_mode
            if stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode):
                ignored.add(name)
    return ignored
