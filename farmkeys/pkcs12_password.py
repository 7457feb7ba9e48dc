"""The password on a node's ``.p12`` files: ``[node] pkcs12_password_file``.

A Java keystore provider (Keycloak's ``java-keystore``) loads only a PKCS#12 with a
password. With the option set, every ``.p12`` the node installs is encrypted with the
password on the first line of that file (:func:`farmkeys.formats.certificates.protect_pkcs12`);
unset, the node writes the leader's bundle as it is, without one.

The file is a secret like ``directory.password_file``: private (no group or other
permission bits) and, with every folder above it, only root's or this account's to
change (:func:`farmkeys.file_trust.read_private_file`). It is read at most once per sync
and only when something is installed or the file changed; its content never reaches a
log, an error or the store.

How the store knows its protection: the manifest records, for a store with a password,
the file's *marker* (:func:`marker`): its device, inode, modification and change times.
That is not secret and says nothing about the password (no digest of it, which would be
a cheap offline verifier), yet any write to the file, a replacement or a ``chmod``
changes it, since only root can set a ctime back. A sync compares markers with one
``stat``; only when they differ does it read the file and open one installed ``.p12``
with it (one PBKDF2): if it opens, only the marker is noted; if not, or when the option
was turned on or off, every certificate is installed again from the config DB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from farmkeys.errors import ConfigError
from farmkeys.file_trust import read_private_file

WHAT = "node.pkcs12_password_file"
_TODO = "check the path and that the service account can read it"
# Java and OpenSSL encode a password's other characters differently (UTF-16 from their
# own decoding): printable ASCII reads the same in both.
_PRINTABLE = frozenset(range(0x20, 0x7F))


def marker(path: str) -> str:
    """What identifies the current version of the password file ``path`` without reading
    it: its device, inode and modification and change times (nanoseconds). One ``stat``."""
    try:
        found = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {WHAT} {path}: {exc.strerror}", _TODO) from None
    return f"{found.st_dev}:{found.st_ino}:{found.st_mtime_ns}:{found.st_ctime_ns}"


def read(path: str) -> bytes:
    """The password on the first line of ``path``, refused (:class:`ConfigError`, one line
    that never holds the password) when the file is exposed, empty or not printable ASCII."""
    raw = read_private_file(Path(path), what=WHAT, error=ConfigError, limit=4096)
    lines = raw.splitlines()
    password = lines[0] if lines else b""
    if not password:
        raise ConfigError(
            f"{WHAT} {path} is empty",
            "write the .p12 password on its first line (for example: openssl rand -base64 32)",
        )
    if not set(password) <= _PRINTABLE:
        raise ConfigError(
            f"{WHAT} {path} holds characters other than printable ASCII on its first line",
            "use printable ASCII, which Java and OpenSSL read alike (openssl rand -base64 32)",
        )
    return password


@dataclass
class Protection:
    """The protection this node's configuration asks for: no password (``path`` None), or
    the one in ``path``, whose :func:`marker` was taken when this was made. The password
    is read once, when first asked for."""

    path: str | None
    marker: str | None = None
    _password: bytes | None = field(default=None, repr=False)

    @classmethod
    def configured(cls, path: str | None) -> Protection:
        """The protection ``node.pkcs12_password_file`` (``path``) asks for: one ``stat``."""
        return cls(path=path, marker=None if path is None else marker(path))

    def password(self) -> bytes | None:
        """The password, read (and checked) on the first call; None without the option."""
        if self.path is None:
            return None
        if self._password is None:
            self._password = read(self.path)
        return self._password
