"""The directory client: :class:`Directory` over ldap3. The package's docstring
(:mod:`farmkeys.directory`) describes the interface; this module is loaded, with ldap3, on
the first use of a name from it. The connection (servers, TLS, bind, retries, failover)
is :mod:`farmkeys.directory.connection`; who may read the keys (the descriptor of a new
entry on ``ad`` and its check, the anonymous-read check) :mod:`farmkeys.directory.access`.

Key bytes and passwords never appear in a log line, an exception message or a
repr: keys and entries are named by their GUIDs and DNs only.
"""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import ldap3
from ldap3.core import exceptions as ldap_exc
from ldap3.utils.dn import parse_dn

from farmkeys.config import DirectoryConfig, RetryConfig
from farmkeys.directory.access import Access
from farmkeys.directory.connection import (
    SETUP_DOC,
    Connection,
    describe,
    first_value,
    found_entries,
    parses_as_dn,
)
from farmkeys.directory.layout import (
    KEY_ID_ATTRIBUTE,
    POLICY_ATTRIBUTE,
    POLICY_CN,
    Layout,
)
from farmkeys.directory.settings import validate
from farmkeys.errors import DirectoryError, FarmConflictError, MasterKeyMissingError

log = logging.getLogger(__name__)

__all__ = ["MASTER_KEY_LENGTH", "SETUP_DOC", "Directory", "MasterKeyInfo"]

MASTER_KEY_LENGTH = 32
"""Bytes of one master key (AD FS's DKM keys are 256 bits too)."""

_GENERALIZED_TIME = re.compile(r"^(\d{14})(?:[.,]\d+)?Z$")


@dataclass(frozen=True)
class MasterKeyInfo:
    """What ``farmkeys status`` may know about a master key: never the key itself."""

    id: uuid.UUID
    created_at: datetime | None
    current: bool


def _parse_generalized_time(value: str) -> datetime | None:
    match = _GENERALIZED_TIME.match(value.strip())
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)


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
        self._keys: dict[tuple[uuid.UUID, uuid.UUID], bytes] = {}
        self._key_reads = 0

    def __repr__(self) -> str:
        return (
            f"Directory({self.endpoint!r}, bind_dn={self._config.bind_dn!r}, "
            f"layout={self._config.layout!r})"
        )

    # -- public API ---------------------------------------------------------------

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

    @property
    def container(self) -> str:
        """The DKM parent (``directory.container``) under which each farm has its container."""
        return self._config.container

    @property
    def layout(self) -> Layout:
        """The directory layout (``openldap`` or ``ad``)."""
        return self._layout

    @property
    def key_reads(self) -> int:
        """How many master-key reads this object sent to the server."""
        return self._key_reads

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

    def container_dn(self, group: uuid.UUID) -> str:
        """The DN of the DKM container of ``group``."""
        return f"cn={group},{self._config.container}"

    def container_exists(self, group: uuid.UUID) -> bool:
        """Whether the DKM container of ``group`` exists and this account can see it."""
        dn = self.container_dn(group)
        return self._link.exists(dn)

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
            created.append(self._add_key_entry(group, key_id))
            created.append(self._add_policy_entry(group, key_id))
        except BaseException:
            self._link.remove_best_effort(reversed(created))
            raise
        log.info(
            "created DKM container %s with master key %s in %s", container, key_id, self.endpoint
        )
        return key_id

    def delete_container(self, group: uuid.UUID) -> None:
        """Remove the DKM container of ``group`` and everything in it (no-op if absent)."""
        container = self.container_dn(group)

        def children(conn: ldap3.Connection) -> list[str]:
            try:
                conn.search(
                    container,
                    "(objectClass=*)",
                    search_scope=ldap3.SUBTREE,
                    attributes=[ldap3.NO_ATTRIBUTES],
                )
            except ldap_exc.LDAPNoSuchObjectResult:
                return []
            return [str(e["dn"]) for e in found_entries(conn)]

        dns = self._link.run(children)
        # Leaves first: the deeper a DN, the more RDNs it has.
        for dn in sorted(dns, key=lambda d: len(parse_dn(d)), reverse=True):
            self._link.delete(dn)
        if dns:
            with self._link.lock:
                self._keys = {k: v for k, v in self._keys.items() if k[0] != group}
            log.info("deleted DKM container %s from %s", container, self.endpoint)

    def add_key(self, group: uuid.UUID, *, make_current: bool) -> uuid.UUID:
        """Add a random master key to ``group``; ``make_current`` names it in CryptoPolicy."""
        key_id = uuid.uuid4()
        dn = self._add_key_entry(group, key_id)
        if make_current:
            try:
                self.set_current_key(group, key_id)
            except BaseException:
                self._link.remove_best_effort([dn])
                raise
        log.info(
            "added master key %s to DKM group %s%s",
            key_id,
            group,
            " and made it current" if make_current else "",
        )
        return key_id

    def ensure_key(self, group: uuid.UUID, key_id: uuid.UUID, key: bytes | None = None) -> bool:
        """Add master key ``key_id`` to ``group`` unless an entry of that id exists.

        ``key`` gives the bytes (an escrow import); None makes 32 random ones.
        True when this call added it. An entry of that id is never replaced: the
        caller reads it back to learn which bytes the directory holds.
        """
        if key is not None and len(key) != MASTER_KEY_LENGTH:
            raise ValueError(f"a master key is {MASTER_KEY_LENGTH} bytes, not {len(key)}")
        if self._key_entry_dn(group, key_id) is not None:
            return False
        try:
            self._add_key_entry(group, key_id, key)
        except DirectoryError as exc:
            if isinstance(exc.__cause__, ldap_exc.LDAPEntryAlreadyExistsResult):
                return False  # another writer added it between the look and the add
            raise
        log.info("added master key %s to DKM group %s", key_id, group)
        return True

    def delete_key(self, group: uuid.UUID, key_id: uuid.UUID) -> None:
        """Remove master key ``key_id`` from the directory and from this object's memory.

        A no-op when it is already gone. Blobs sealed under it can never be opened again.
        """
        dn = self._key_entry_dn(group, key_id)
        if dn is not None:
            self._link.delete(dn)
        self.forget(group, key_id)
        log.info("deleted master key %s of DKM group %s", key_id, group)

    def forget(self, group: uuid.UUID, key_id: uuid.UUID) -> None:
        """Drop a cached master key from memory (it was deleted from the directory)."""
        with self._link.lock:
            self._keys.pop((group, key_id), None)

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
        if not self._link.exists(self._policy_dn(group)):
            self._add_policy_entry(group, current)
            created = True
        if created:
            log.info("re-created DKM container %s in %s", container, self.endpoint)
        return created

    def set_current_key(self, group: uuid.UUID, key_id: uuid.UUID) -> None:
        """Name ``key_id`` as the current master key of ``group`` in CryptoPolicy."""
        policy = self._policy_dn(group)

        def modify(conn: ldap3.Connection) -> None:
            conn.modify(policy, {POLICY_ATTRIBUTE: [(ldap3.MODIFY_REPLACE, [str(key_id)])]})

        self._link.run(modify, writing=policy)

    def current_key_id(self, group: uuid.UUID) -> uuid.UUID:
        """The id of the current master key of ``group``, from its CryptoPolicy."""
        policy = self._policy_dn(group)

        def read(conn: ldap3.Connection) -> bytes | None:
            try:
                conn.search(policy, "(objectClass=*)", ldap3.BASE, attributes=[POLICY_ATTRIBUTE])
            except ldap_exc.LDAPNoSuchObjectResult:
                return None
            found = found_entries(conn)
            return first_value(found[0], POLICY_ATTRIBUTE) if found else None

        value = self._link.run(read)
        if value is None:
            raise DirectoryError(
                f"{policy} is missing from the directory at {self.endpoint}, "
                f"or {self._config.bind_dn} cannot read it",
                "run `farmkeys init`, restore the DKM container from a directory backup, "
                f"or check the account's access ({SETUP_DOC})",
            )
        try:
            return uuid.UUID(value.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise DirectoryError(
                f"{policy} in the directory at {self.endpoint} names no valid key id "
                f"in {POLICY_ATTRIBUTE}",
                "restore the DKM container from a directory backup",
            ) from None

    def master_key(self, group: uuid.UUID, key_id: uuid.UUID) -> bytes:
        """The 32 bytes of master key ``key_id``; read from the server once per object."""
        with self._link.lock:
            cached = self._keys.get((group, key_id))
            if cached is not None:
                return cached
            attribute = self._layout.key_attribute

            def read(conn: ldap3.Connection) -> bytes | None:
                self._key_reads += 1
                found = self._search_key(conn, group, key_id, [attribute])
                return first_value(found, attribute) if found else None

            key = self._link.run(read)
            if key is None:
                raise MasterKeyMissingError(
                    f"master key {key_id} of DKM group {group} is missing from the directory "
                    f"at {self.endpoint}, or {self._config.bind_dn} cannot read it",
                    "restore it with `farmkeys escrow import` or from a directory backup, or check"
                    " the account's access "
                    f"({SETUP_DOC})",
                )
            if len(key) != MASTER_KEY_LENGTH:
                raise MasterKeyMissingError(
                    f"master key {key_id} of DKM group {group} in the directory at "
                    f"{self.endpoint} is {len(key)} bytes long, not {MASTER_KEY_LENGTH}",
                    "restore it with `farmkeys escrow import` or from a directory backup",
                )
            self._keys[(group, key_id)] = key
            log.debug("read master key %s of DKM group %s", key_id, group)
            return key

    def list_keys(self, group: uuid.UUID) -> list[MasterKeyInfo]:
        """The master keys of ``group``, oldest first, without reading any key material."""
        container = self.container_dn(group)
        found = self._key_entries(group, [KEY_ID_ATTRIBUTE, self._layout.created_attribute])
        if found is None:
            raise MasterKeyMissingError(
                f"the DKM container {container} is missing from the directory at "
                f"{self.endpoint}, or {self._config.bind_dn} cannot read it",
                "restore it with `farmkeys escrow import` or from a directory backup, or check"
                f" the account's access ({SETUP_DOC})",
            )
        current = self.current_key_id(group)
        keys: list[MasterKeyInfo] = []
        for entry in found:
            raw_id = first_value(entry, KEY_ID_ATTRIBUTE)
            try:
                key_id = uuid.UUID(raw_id.decode("utf-8")) if raw_id else None
            except (UnicodeDecodeError, ValueError):
                key_id = None
            if key_id is None:
                log.warning("ignoring %s: its %s is not a key id", entry["dn"], KEY_ID_ATTRIBUTE)
                continue
            stamp = first_value(entry, self._layout.created_attribute)
            created = _parse_generalized_time(stamp.decode("ascii", "replace")) if stamp else None
            keys.append(MasterKeyInfo(id=key_id, created_at=created, current=key_id == current))
        far_past = datetime.min.replace(tzinfo=UTC)
        keys.sort(key=lambda k: (k.created_at or far_past, str(k.id)))
        return keys

    def find_keys(self, key_id: uuid.UUID) -> list[tuple[str, bytes]]:
        """Master keys anywhere under ``directory.container``, for reading another farm's
        blobs (an AD FS farm's DKM container): the entries whose ``l`` is ``key_id`` first,
        then every other key entry there, as (DN, 32 bytes) pairs; never cached. The id a
        blob names is a hint only (AD FS does not authenticate it): its MAC decides.
        """
        attribute = self._layout.key_attribute
        base = self._config.container

        def search(conn: ldap3.Connection) -> list[tuple[bool, str, bytes]]:
            try:
                conn.search(
                    base,
                    f"(&(objectClass={self._layout.key_class})({attribute}=*))",
                    search_scope=ldap3.SUBTREE,
                    attributes=[attribute, KEY_ID_ATTRIBUTE],
                )
            except ldap_exc.LDAPNoSuchObjectResult:
                return []
            named = str(key_id).encode()  # compared as LDAP's caseIgnoreMatch of `l` would
            found = (
                (
                    (first_value(e, KEY_ID_ATTRIBUTE) or b"").strip().lower() == named,
                    str(e["dn"]),
                    first_value(e, attribute),
                )
                for e in found_entries(conn)
            )
            return [(n, dn, key) for n, dn, key in found if key and len(key) == MASTER_KEY_LENGTH]

        found = self._link.run(search)
        # The entries the blob names first; sorted() keeps the directory's order otherwise.
        return [(dn, key) for _, dn, key in sorted(found, key=lambda f: not f[0])]

    def anonymous_can_read(self, group: uuid.UUID) -> bool:
        """Whether an anonymous bind can see any master-key entry of ``group`` or its key.

        Looks both ways: a subtree search under the container, and a base read
        of every key the service account knows of (in case the container
        itself is hidden but its children are not).
        """
        try:
            known = [str(e["dn"]) for e in self._key_entries(group, [ldap3.NO_ATTRIBUTES]) or []]
        except DirectoryError:
            known = []
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

    # -- entries ------------------------------------------------------------------

    def _key_dn(self, group: uuid.UUID, key_id: uuid.UUID) -> str:
        return f"cn={key_id},{self.container_dn(group)}"

    def _policy_dn(self, group: uuid.UUID) -> str:
        return f"cn={POLICY_CN},{self.container_dn(group)}"

    def _key_entries(self, group: uuid.UUID, attributes: list[str]) -> list[dict[str, Any]] | None:
        """The master-key entries (those with an ``l``) of ``group``'s container, or None
        when the container is missing or hidden from this account."""
        container = self.container_dn(group)

        def search(conn: ldap3.Connection) -> list[dict[str, Any]] | None:
            try:
                conn.search(
                    container,
                    f"(&(objectClass={self._layout.key_class})({KEY_ID_ATTRIBUTE}=*))",
                    search_scope=ldap3.LEVEL,
                    attributes=attributes,
                )
            except ldap_exc.LDAPNoSuchObjectResult:
                return None
            return found_entries(conn)

        return self._link.run(search)

    def _search_key(
        self, conn: ldap3.Connection, group: uuid.UUID, key_id: uuid.UUID, attributes: list[str]
    ) -> dict[str, Any] | None:
        """The entry whose ``l`` is ``key_id`` in the container of ``group``, or None.

        By ``l``, not by name, so a container AD FS made reads the same way.
        """
        try:
            conn.search(
                self.container_dn(group),
                f"(&(objectClass={self._layout.key_class})({KEY_ID_ATTRIBUTE}={key_id}))",
                search_scope=ldap3.LEVEL,
                attributes=attributes,
            )
        except ldap_exc.LDAPNoSuchObjectResult:
            return None
        found = found_entries(conn)
        if len(found) > 1:
            raise DirectoryError(
                f"the DKM container {self.container_dn(group)} at {self.endpoint} holds "
                f"{len(found)} entries for master key {key_id}",
                "remove the duplicates (keep the one whose key the blobs open)",
            )
        return found[0] if found else None

    def _key_entry_dn(self, group: uuid.UUID, key_id: uuid.UUID) -> str | None:
        """The DN of master key ``key_id``'s entry, or None when there is none."""

        def find(conn: ldap3.Connection) -> str | None:
            found = self._search_key(conn, group, key_id, [ldap3.NO_ATTRIBUTES])
            return str(found["dn"]) if found else None

        return self._link.run(find)

    def _add_container_entry(self, group: uuid.UUID, farm_name: str) -> str:
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

    def _add_policy_entry(self, group: uuid.UUID, current: uuid.UUID) -> str:
        dn = self._policy_dn(group)
        protection, controls = self._access.new_entry_protection()
        self._add(
            dn,
            self._layout.key_classes,
            {
                "cn": POLICY_CN,
                POLICY_ATTRIBUTE: str(current),
                **self._layout.policy_extra,
                **protection,
            },
            controls=controls,
        )
        return dn

    def _add_key_entry(self, group: uuid.UUID, key_id: uuid.UUID, key: bytes | None = None) -> str:
        dn = self._key_dn(group, key_id)
        protection, controls = self._access.new_entry_protection()
        self._add(
            dn,
            self._layout.key_classes,
            {
                "cn": str(key_id),
                KEY_ID_ATTRIBUTE: str(key_id),
                self._layout.key_attribute: key
                if key is not None
                else secrets.token_bytes(MASTER_KEY_LENGTH),
                **self._layout.key_extra,
                **protection,
            },
            controls=controls,
        )
        return dn

    def _add(
        self,
        dn: str,
        classes: tuple[str, ...],
        attributes: dict[str, Any],
        *,
        creating_container: bool = False,
        controls: list[Any] | None = None,
    ) -> None:
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
