"""The directory client: :class:`Directory`, the one object callers hold. The package's
docstring (:mod:`farmkeys.directory`) describes the interface; this module is loaded, with
ldap3, on the first use of a name from it.

:class:`Directory` composes its parts over one :class:`~.connection.Connection`:
:class:`~.keys.Keys` (the master keys and their cache), :class:`~.keys.CryptoPolicy`
(which key is current) and :class:`~.access.Access` (who may read them). What it does
itself is a DKM container's life, which takes them all: create the container with its
first key and CryptoPolicy (undone on failure), re-create it, delete it. Its public
methods are the ones callers used before the parts existed; each part's own methods
are the package's business.

Key bytes and passwords never appear in a log line, an exception message or a
repr: keys and entries are named by their GUIDs and DNs only.
"""

from __future__ import annotations

import logging
import uuid
from types import TracebackType
from typing import Any, Self

import ldap3
from ldap3.core import exceptions as ldap_exc

from farmkeys.config import DirectoryConfig, RetryConfig
from farmkeys.directory.access import Access
from farmkeys.directory.connection import (
    SETUP_DOC,
    Connection,
    describe,
    parses_as_dn,
)
from farmkeys.directory.keys import CryptoPolicy, Keys, MasterKeyInfo, NewEntry
from farmkeys.directory.layout import Layout, container_dn, policy_dn
from farmkeys.directory.settings import validate
from farmkeys.errors import DirectoryError, FarmConflictError

log = logging.getLogger(__name__)


class Directory:
    """The farm's master keys in an LDAP directory, through the service account.

    Construction validates the configuration and does no I/O; the first
    operation connects and binds, retrying transient failures within
    ``retry``. A connection lost mid-operation (the server restarted) is
    re-opened once and the operation repeated, so a long-lived node rides
    out a directory restart. Master keys read once are kept in this object
    (in memory only) and never read again; :attr:`key_reads` counts the reads
    that reached the server. Thread-safe: one lock serialises the operations.
    """

    def __init__(self, config: DirectoryConfig, retry: RetryConfig) -> None:
        self._config = config
        self._layout = validate(config, is_dn=parses_as_dn)
        self._link = Connection(config, retry)
        self._access = Access(self._link, config, self._layout)
        self._policy = CryptoPolicy(self._link, config, self._layout, self._access)
        self._keys = Keys(self._link, config, self._layout, self._access, self._policy)

    def __repr__(self) -> str:
        return (
            f"Directory({self.endpoint!r}, bind_dn={self._config.bind_dn!r}, "
            f"layout={self._config.layout!r})"
        )

    # -- the connection ---------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The directory server in use (or, before the first bind, the list), for messages."""
        return self._link.endpoint

    @property
    def last_server(self) -> str | None:
        """The URL of the server (domain controller) this object last bound to, if any."""
        return self._link.last_server

    @property
    def _conn(self) -> ldap3.Connection | None:
        """The ldap3 connection now open, if any."""
        return self._link.current

    def bind(self) -> None:
        """Connect and bind now, so a bad URL or password fails before anything is written."""
        self._link.bind()

    def close(self) -> None:
        """Close the connection (a later operation opens a new one). Keeps the key cache."""
        self._link.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the DKM container ------------------------------------------------------------

    @property
    def container(self) -> str:
        """The DKM parent (``directory.container``) under which each farm has its container."""
        return self._config.container

    @property
    def layout(self) -> Layout:
        """The directory layout (``openldap`` or ``ad``)."""
        return self._layout

    def container_dn(self, group: uuid.UUID) -> str:
        """The DN of the DKM container of ``group``."""
        return container_dn(self._config.container, group)

    def container_exists(self, group: uuid.UUID) -> bool:
        """Whether the DKM container of ``group`` exists and this account can see it."""
        return self._link.exists(self.container_dn(group))

    def create_container(self, group: uuid.UUID, *, farm_name: str) -> uuid.UUID:
        """Create the DKM container of ``group``, its first master key and CryptoPolicy.

        Returns the id of the new key, which CryptoPolicy names as current.
        On any failure, removes whatever it created (best effort) and raises.
        """
        container = self.container_dn(group)
        key_id = uuid.uuid4()
        created: list[str] = []
        try:
            created.append(self._add_container_entry(group, farm_name))
            created.append(self._write(self._keys.key_entry(group, key_id)))
            created.append(self._write(self._policy.entry(group, key_id)))
        except BaseException:
            self._link.remove_best_effort(reversed(created))
            raise
        log.info(
            "created DKM container %s with master key %s in %s", container, key_id, self.endpoint
        )
        return key_id

    def restore_container(self, group: uuid.UUID, *, farm_name: str, current: uuid.UUID) -> bool:
        """Re-create the DKM container of ``group`` and its CryptoPolicy (naming ``current``)
        where they are missing, without any key. True when anything was created.

        A re-created container is protected as the first one was: on the
        ``ad`` layout it gets the same security descriptor in the same add; on
        ``openldap`` the rule on the DKM parent covers it
        (``docs/directory-setup.md``).
        """
        created = False
        container = self.container_dn(group)
        if not self._link.exists(container):
            self._add_container_entry(group, farm_name)
            created = True
        if not self._link.exists(policy_dn(self._config.container, group)):
            self._write(self._policy.entry(group, current))
            created = True
        if created:
            log.info("re-created DKM container %s in %s", container, self.endpoint)
        return created

    def delete_container(self, group: uuid.UUID) -> None:
        """Remove the DKM container of ``group`` and everything in it (no-op if absent)."""
        container = self.container_dn(group)
        if self._link.delete_tree(container):
            self._keys.forget_group(group)
            log.info("deleted DKM container %s from %s", container, self.endpoint)

    def _add_container_entry(self, group: uuid.UUID, farm_name: str) -> str:
        """Add the container entry itself; on ``ad``, read its descriptor back and remove
        the container again unless it is the protected one."""
        dn = self.container_dn(group)
        protection, controls = self._access.new_entry_protection()
        self._add(
            dn,
            self._layout.container_classes,
            {
                "cn": str(group),
                "description": f"farmkeys DKM container for farm {farm_name}",
                **protection,
            },
            creating_container=True,
            controls=controls,
        )
        if self._layout.protects_container:
            try:
                problem = self.container_protection_problem(group)
            except BaseException:
                self._link.remove_best_effort([dn])
                raise
            if problem is not None:
                self._link.remove_best_effort([dn])
                raise DirectoryError(
                    f"the DKM container {dn} was created at {self.endpoint} but {problem}; "
                    "it was removed again and no key was written",
                    self._access.delegation_hint(),
                )
        return dn

    def _write(self, entry: NewEntry) -> str:
        self._add(entry.dn, entry.classes, entry.attributes, controls=entry.controls)
        return entry.dn

    def _add(
        self,
        dn: str,
        classes: tuple[str, ...],
        attributes: dict[str, Any],
        *,
        creating_container: bool = False,
        controls: list[Any] | None = None,
    ) -> None:
        """Every add of a container's life; a refused container says why in the
        operator's words (a conflict, a missing parent, a refused descriptor)."""
        try:
            self._link.add(dn, classes, attributes, controls=controls)
        except DirectoryError as exc:
            cause = exc.__cause__
            if creating_container and isinstance(cause, ldap_exc.LDAPEntryAlreadyExistsResult):
                raise FarmConflictError(
                    f"the directory at {self.endpoint} already holds a DKM container {dn}",
                    "a farm was already initialised with this DKM group: reuse its config, "
                    "or remove the container if it is a leftover",
                ) from cause
            if creating_container and isinstance(cause, ldap_exc.LDAPNoSuchObjectResult):
                raise DirectoryError(
                    f"the DKM parent container {self._config.container} does not exist in "
                    f"the directory at {self.endpoint} (or {self._config.bind_dn} cannot see it)",
                    f"create it as {SETUP_DOC} shows, or correct directory.container",
                ) from cause
            if creating_container and self._layout.protects_container:
                raise DirectoryError(
                    f"the directory at {self.endpoint} refused to create the DKM container "
                    f"{dn} with its protected security descriptor: "
                    f"{describe(cause) if cause else exc.what}",
                    self._access.delegation_hint(),
                ) from cause
            raise

    # -- the master keys (keys.py) ------------------------------------------------------

    @property
    def key_reads(self) -> int:
        """How many master-key reads this object sent to the server."""
        return self._keys.key_reads

    def master_key(self, group: uuid.UUID, key_id: uuid.UUID) -> bytes:
        """The 32 bytes of master key ``key_id``; read from the server once per object."""
        return self._keys.master_key(group, key_id)

    def list_keys(self, group: uuid.UUID) -> list[MasterKeyInfo]:
        """The master keys of ``group``, oldest first, without reading any key material."""
        return self._keys.list_keys(group)

    def find_keys(self, key_id: uuid.UUID) -> list[tuple[str, bytes]]:
        """Master keys anywhere under ``directory.container``, for reading another farm's
        blobs (an AD FS farm's DKM container): the entries whose ``l`` is ``key_id`` first,
        then every other key entry there, as (DN, 32 bytes) pairs; never cached. The id a
        blob names is a hint only (AD FS does not authenticate it): its MAC decides.
        """
        return self._keys.find_keys(key_id)

    def current_key_id(self, group: uuid.UUID) -> uuid.UUID:
        """The id of the current master key of ``group``, from its CryptoPolicy."""
        return self._policy.current_key_id(group)

    def set_current_key(self, group: uuid.UUID, key_id: uuid.UUID) -> None:
        """Name ``key_id`` as the current master key of ``group`` in CryptoPolicy."""
        self._policy.set_current_key(group, key_id)

    def add_key(self, group: uuid.UUID, *, make_current: bool) -> uuid.UUID:
        """Add a random master key to ``group``; ``make_current`` names it in CryptoPolicy."""
        return self._keys.add_key(group, make_current=make_current)

    def ensure_key(self, group: uuid.UUID, key_id: uuid.UUID, key: bytes | None = None) -> bool:
        """Add master key ``key_id`` to ``group`` unless an entry of that id exists.

        ``key`` gives the bytes (an escrow import); None makes 32 random ones.
        True when this call added it. An entry of that id is never replaced: the
        caller reads it back to learn which bytes the directory holds.
        """
        return self._keys.ensure_key(group, key_id, key)

    def delete_key(self, group: uuid.UUID, key_id: uuid.UUID) -> None:
        """Remove master key ``key_id`` from the directory and from this object's memory.

        A no-op when it is already gone. Blobs sealed under it can never be opened again.
        """
        self._keys.delete_key(group, key_id)

    def forget(self, group: uuid.UUID, key_id: uuid.UUID) -> None:
        """Drop a cached master key from memory (it was deleted from the directory)."""
        self._keys.forget(group, key_id)

    # -- who may read them (access.py) ----------------------------------------------------

    def anonymous_can_read(self, group: uuid.UUID) -> bool:
        """Whether an anonymous bind can see any master-key entry of ``group`` or its key.

        Looks both ways: a subtree search under the container, and a base read
        of every key the service account knows of (in case the container
        itself is hidden but its children are not).
        """
        known = self._keys.known_dns(group)
        return self._access.anonymous_can_read(self.container_dn(group), known)

    def service_sid(self) -> str:
        """The objectSid of the service account (Active Directory), read once per object."""
        return self._access.service_sid()

    def container_protection_problem(self, group: uuid.UUID) -> str | None:
        """On the ``ad`` layout: why the farm's container, or an entry in it, would let
        someone other than the service account, Domain Admins and SYSTEM read the keys;
        None when every descriptor is the protected one farmkeys writes (always None on
        ``openldap``, whose access rule is the server's)."""
        return self._access.container_problem(self.container_dn(group))
