"""Master keys in LDAP, in the shape of AD FS's DKM container.

One interface, :class:`Directory`, over two layouts of the same tree
(:mod:`farmkeys.directory.layout`): ``openldap`` (stock OpenLDAP schema,
:mod:`~farmkeys.directory.openldap`) and ``ad`` (AD FS's own contacts on
Active Directory, with a protected security descriptor on the farm's
container, :mod:`~farmkeys.directory.ad`). Who may read what is the
directory's access control (``docs/directory-setup.md``): the farm's service
account alone sees anything in the farm's container. A directory hides an
entry from an account that may not read it, so "missing" and "not
readable" look alike from here and every message says both.

``directory.url`` may list several servers (domain controllers): the first
that answers is used, and when it stops answering the next one is, for reads
and writes alike. :attr:`Directory.last_server` names the one in use.

Key bytes and passwords never appear in a log line, an exception message or a
repr: keys and entries are named by their GUIDs and DNs only.

The package, by what each module owns:

- :mod:`~farmkeys.directory.client`: :class:`Directory`, composing the parts below, and a
  DKM container's life (create it with its first key and CryptoPolicy, re-create, delete);
- :mod:`~farmkeys.directory.connection`: the list of servers, TLS, the bind, retries and
  failover between the URLs;
- :mod:`~farmkeys.directory.keys`: reading (cached), listing, adding and deleting master
  keys, and CryptoPolicy, which names the current one;
- :mod:`~farmkeys.directory.access`: who may read the keys (the descriptor of a new entry
  and its check on ``ad``, the anonymous-read check);
- :mod:`~farmkeys.directory.layout`, :mod:`~farmkeys.directory.openldap`,
  :mod:`~farmkeys.directory.ad`: the tree and what differs between the two layouts;
- :mod:`~farmkeys.directory.security_descriptor`: the Windows security-descriptor codec;
- :mod:`~farmkeys.directory.settings`: the settings' checks, without ldap3.

The ldap3 modules are imported on first use of a name from here: a `farmkeys sync`
that finds nothing changed never loads them (:class:`Deferred`).
"""

from __future__ import annotations

import importlib
import uuid
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from farmkeys.config import DirectoryConfig, RetryConfig
    from farmkeys.directory.client import Directory
    from farmkeys.directory.connection import SETUP_DOC
    from farmkeys.directory.keys import MASTER_KEY_LENGTH, MasterKeyInfo

__all__ = [
    "MASTER_KEY_LENGTH",
    "SETUP_DOC",
    "Deferred",
    "Directory",
    "MasterKeyInfo",
    "MasterKeys",
]


_SUBMODULES = frozenset(
    {
        "access",
        "ad",
        "client",
        "connection",
        "keys",
        "layout",
        "openldap",
        "security_descriptor",
        "settings",
    }
)

# The names exported from the modules that load ldap3, and the module each is in.
_LAZY = {
    "Directory": "client",
    "MASTER_KEY_LENGTH": "keys",
    "MasterKeyInfo": "keys",
    "SETUP_DOC": "connection",
}


def __getattr__(name: str) -> Any:  # noqa: ANN401 - a submodule, a class or a constant
    if name in _SUBMODULES:  # `from farmkeys.directory import ad`: the submodule itself
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MasterKeys(Protocol):
    """What a sync needs of the directory: master keys by id, and where it read them."""

    def master_key(self, group: uuid.UUID, key_id: uuid.UUID) -> bytes: ...

    @property
    def last_server(self) -> str | None: ...


class Deferred:
    """A :class:`Directory` made on its first use. `farmkeys sync` hands one to the sync:
    when nothing changed, no master key is needed, and neither ldap3 nor the directory
    settings are checked as a :class:`Directory` checks them, but for the full parse of the
    DNs, which waits for the first use (that makes the real directory)."""

    def __init__(self, config: DirectoryConfig, retry: RetryConfig) -> None:
        from farmkeys.directory.settings import validate

        validate(config)  # bad settings fail at start, as a Directory's would
        self._config, self._retry = config, retry
        self._real: Directory | None = None

    def real(self) -> Directory:
        if self._real is None:
            from farmkeys.directory.client import Directory

            self._real = Directory(self._config, self._retry)
        return self._real

    @property
    def made(self) -> bool:
        return self._real is not None

    def master_key(self, group: uuid.UUID, key_id: uuid.UUID) -> bytes:
        return self.real().master_key(group, key_id)

    @property
    def last_server(self) -> str | None:
        return None if self._real is None else self._real.last_server

    def close(self) -> None:
        if self._real is not None:
            self._real.close()
