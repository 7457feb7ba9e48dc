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

The implementation is :mod:`farmkeys.directory.client`, imported (with ldap3) on
first use of a name from here: a `farmkeys sync` that finds nothing changed
never loads it (:class:`Deferred`).
"""

from __future__ import annotations

import importlib
import uuid
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from farmkeys.config import DirectoryConfig, RetryConfig
    from farmkeys.directory.client import (
        MASTER_KEY_LENGTH,
        SETUP_DOC,
        Directory,
        MasterKeyInfo,
    )

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
        "layout",
        "openldap",
        "security_descriptor",
        "settings",
    }
)


def __getattr__(name: str) -> Any:  # noqa: ANN401 - whatever the client module holds
    if name in _SUBMODULES:  # `from farmkeys.directory import ad`: the submodule itself
        return importlib.import_module(f"{__name__}.{name}")
    client = importlib.import_module("farmkeys.directory.client")
    try:
        return getattr(client, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


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
