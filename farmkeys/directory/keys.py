"""The master keys in a DKM container: reading them (cached), listing them without their
bytes, adding and deleting them, and CryptoPolicy, which names the current one.

A key is found by its ``l`` value (:data:`~farmkeys.directory.layout.KEY_ID_ATTRIBUTE`),
never by its name, so a container that AD FS made reads the same way. Key bytes read
once are kept in memory (never on disk) for the life of the Directory and never read
again; :attr:`Keys.key_reads` counts the reads that reached the server. Key bytes never
appear in a log line, an exception message or a repr: keys are named by their ids.
"""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import ldap3
from ldap3.core import exceptions as ldap_exc

from farmkeys.config import DirectoryConfig
from farmkeys.directory.access import Access
from farmkeys.directory.connection import SETUP_DOC, Connection, first_value, found_entries
from farmkeys.directory.layout import (
    KEY_ID_ATTRIBUTE,
    POLICY_ATTRIBUTE,
    POLICY_CN,
    Layout,
    container_dn,
    key_dn,
    policy_dn,
)
from farmkeys.errors import DirectoryError, MasterKeyMissingError

log = logging.getLogger(__name__)

MASTER_KEY_LENGTH = 32
"""Bytes of one master key (AD FS's DKM keys are 256 bits too)."""

_GENERALIZED_TIME = re.compile(r"^(\d{14})(?:[.,]\d+)?Z$")


@dataclass(frozen=True)
class MasterKeyInfo:
    """What ``farmkeys status`` may know about a master key: never the key itself."""

    id: uuid.UUID
    created_at: datetime | None
    current: bool


@dataclass(frozen=True)
class NewEntry:
    """An entry to add: its DN, object classes, attributes (which may hold a key: never in
    a repr) and the controls the add is sent with."""

    dn: str
    classes: tuple[str, ...]
    attributes: dict[str, Any] = field(repr=False)
    controls: list[Any] | None = None


def _parse_generalized_time(value: str) -> datetime | None:
    match = _GENERALIZED_TIME.match(value.strip())
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)


def _key_info(
    entry: dict[str, Any], created_attribute: str, current: uuid.UUID
) -> MasterKeyInfo | None:
    """A key entry's id, creation time and whether it is ``current``; None when its ``l``
    is not a key id."""
    raw_id = first_value(entry, KEY_ID_ATTRIBUTE)
    try:
        key_id = uuid.UUID(raw_id.decode("utf-8")) if raw_id else None
    except (UnicodeDecodeError, ValueError):
        key_id = None
    if key_id is None:
        return None
    stamp = first_value(entry, created_attribute)
    created = _parse_generalized_time(stamp.decode("ascii", "replace")) if stamp else None
    return MasterKeyInfo(id=key_id, created_at=created, current=key_id == current)


class CryptoPolicy:
    """Each DKM container's CryptoPolicy entry, whose ``displayName`` names the current
    master key, as AD FS's does."""

    def __init__(
        self, link: Connection, config: DirectoryConfig, layout: Layout, access: Access
    ) -> None:
        self._link = link
        self._config = config
        self._layout = layout
        self._access = access

    def current_key_id(self, group: uuid.UUID) -> uuid.UUID:
        """The id of the current master key of ``group``, from its CryptoPolicy."""
        policy = policy_dn(self._config.container, group)

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
                f"{policy} is missing from the directory at {self._link.endpoint}, "
                f"or {self._config.bind_dn} cannot read it",
                "run `farmkeys init`, restore the DKM container from a directory backup, "
                f"or check the account's access ({SETUP_DOC})",
            )
        try:
            return uuid.UUID(value.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise DirectoryError(
                f"{policy} in the directory at {self._link.endpoint} names no valid key id "
                f"in {POLICY_ATTRIBUTE}",
                "restore the DKM container from a directory backup",
            ) from None

    def set_current_key(self, group: uuid.UUID, key_id: uuid.UUID) -> None:
        """Name ``key_id`` as the current master key of ``group`` in CryptoPolicy."""
        policy = policy_dn(self._config.container, group)

        def modify(conn: ldap3.Connection) -> None:
            conn.modify(policy, {POLICY_ATTRIBUTE: [(ldap3.MODIFY_REPLACE, [str(key_id)])]})

        self._link.run(modify, writing=policy)

    def entry(self, group: uuid.UUID, current: uuid.UUID) -> NewEntry:
        """The CryptoPolicy entry of ``group``, naming ``current``, to add."""
        protection, controls = self._access.new_entry_protection()
        return NewEntry(
            policy_dn(self._config.container, group),
            self._layout.key_classes,
            {
                "cn": POLICY_CN,
                POLICY_ATTRIBUTE: str(current),
                **self._layout.policy_extra,
                **protection,
            },
            controls,
        )


class Keys:
    """The master keys of the farm's DKM containers, over one Directory's connection.

    The cache shares the connection's lock, so two threads asking for the same key
    read it from the server once.
    """

    def __init__(
        self,
        link: Connection,
        config: DirectoryConfig,
        layout: Layout,
        access: Access,
        policy: CryptoPolicy,
    ) -> None:
        self._link = link
        self._config = config
        self._layout = layout
        self._access = access
        self._policy = policy
        self._cache: dict[tuple[uuid.UUID, uuid.UUID], bytes] = {}
        self._reads = 0

    @property
    def key_reads(self) -> int:
        """How many master-key reads were sent to the server."""
        return self._reads

    def _container(self, group: uuid.UUID) -> str:
        return container_dn(self._config.container, group)

    # -- reading -------------------------------------------------------------------------

    def master_key(self, group: uuid.UUID, key_id: uuid.UUID) -> bytes:
        """The 32 bytes of master key ``key_id``; read from the server once."""
        with self._link.lock:
            cached = self._cache.get((group, key_id))
            if cached is not None:
                return cached
            attribute = self._layout.key_attribute

            def read(conn: ldap3.Connection) -> bytes | None:
                self._reads += 1
                found = self._search_key(conn, group, key_id, [attribute])
                return first_value(found, attribute) if found else None

            key = self._link.run(read)
            if key is None:
                raise MasterKeyMissingError(
                    f"master key {key_id} of DKM group {group} is missing from the directory "
                    f"at {self._link.endpoint}, or {self._config.bind_dn} cannot read it",
                    "restore it with `farmkeys escrow import` or from a directory backup, or check"
                    " the account's access "
                    f"({SETUP_DOC})",
                )
            if len(key) != MASTER_KEY_LENGTH:
                raise MasterKeyMissingError(
                    f"master key {key_id} of DKM group {group} in the directory at "
                    f"{self._link.endpoint} is {len(key)} bytes long, not {MASTER_KEY_LENGTH}",
                    "restore it with `farmkeys escrow import` or from a directory backup",
                )
            self._cache[(group, key_id)] = key
            log.debug("read master key %s of DKM group %s", key_id, group)
            return key

    def list_keys(self, group: uuid.UUID) -> list[MasterKeyInfo]:
        """The master keys of ``group``, oldest first, without reading any key material."""
        created_attribute = self._layout.created_attribute
        found = self._key_entries(group, [KEY_ID_ATTRIBUTE, created_attribute])
        if found is None:
            raise MasterKeyMissingError(
                f"the DKM container {self._container(group)} is missing from the directory at "
                f"{self._link.endpoint}, or {self._config.bind_dn} cannot read it",
                "restore it with `farmkeys escrow import` or from a directory backup, or check"
                f" the account's access ({SETUP_DOC})",
            )
        current = self._policy.current_key_id(group)
        keys: list[MasterKeyInfo] = []
        for entry in found:
            info = _key_info(entry, created_attribute, current)
            if info is None:
                log.warning("ignoring %s: its %s is not a key id", entry["dn"], KEY_ID_ATTRIBUTE)
                continue
            keys.append(info)
        far_past = datetime.min.replace(tzinfo=UTC)
        keys.sort(key=lambda k: (k.created_at or far_past, str(k.id)))
        return keys

    def find_keys(self, key_id: uuid.UUID) -> list[tuple[str, bytes]]:
        """Master keys anywhere under ``directory.container``: the entries whose ``l`` is
        ``key_id`` first, then every other key entry there, as (DN, 32 bytes); never cached."""
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

    def known_dns(self, group: uuid.UUID) -> list[str]:
        """The DNs of ``group``'s key entries this account sees; none when it cannot list them."""
        try:
            return [str(e["dn"]) for e in self._key_entries(group, [ldap3.NO_ATTRIBUTES]) or []]
        except DirectoryError:
            return []

    # -- adding and deleting -----------------------------------------------------------------

    def key_entry(self, group: uuid.UUID, key_id: uuid.UUID, key: bytes | None = None) -> NewEntry:
        """The entry of master key ``key_id`` holding ``key`` (None: 32 random bytes), to add."""
        protection, controls = self._access.new_entry_protection()
        return NewEntry(
            key_dn(self._config.container, group, key_id),
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
            controls,
        )

    def add_key(self, group: uuid.UUID, *, make_current: bool) -> uuid.UUID:
        """Add a random master key to ``group``; ``make_current`` names it in CryptoPolicy."""
        key_id = uuid.uuid4()
        dn = self._add(self.key_entry(group, key_id))
        if make_current:
            try:
                self._policy.set_current_key(group, key_id)
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
        """Add master key ``key_id`` to ``group`` unless an entry of that id exists; True
        when this call added it. An entry of that id is never replaced."""
        if key is not None and len(key) != MASTER_KEY_LENGTH:
            raise ValueError(f"a master key is {MASTER_KEY_LENGTH} bytes, not {len(key)}")
        if self._key_entry_dn(group, key_id) is not None:
            return False
        try:
            self._add(self.key_entry(group, key_id, key))
        except DirectoryError as exc:
            if isinstance(exc.__cause__, ldap_exc.LDAPEntryAlreadyExistsResult):
                return False  # another writer added it between the look and the add
            raise
        log.info("added master key %s to DKM group %s", key_id, group)
        return True

    def delete_key(self, group: uuid.UUID, key_id: uuid.UUID) -> None:
        """Remove master key ``key_id`` from the directory and from memory; a no-op when
        it is already gone."""
        dn = self._key_entry_dn(group, key_id)
        if dn is not None:
            self._link.delete(dn)
        self.forget(group, key_id)
        log.info("deleted master key %s of DKM group %s", key_id, group)

    def forget(self, group: uuid.UUID, key_id: uuid.UUID) -> None:
        """Drop a cached master key from memory (it was deleted from the directory)."""
        with self._link.lock:
            self._cache.pop((group, key_id), None)

    def forget_group(self, group: uuid.UUID) -> None:
        """Drop every cached master key of ``group`` (its container was deleted)."""
        with self._link.lock:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != group}

    def _add(self, entry: NewEntry) -> str:
        self._link.add(entry.dn, entry.classes, entry.attributes, controls=entry.controls)
        return entry.dn

    # -- searching -----------------------------------------------------------------------------

    def _key_entries(self, group: uuid.UUID, attributes: list[str]) -> list[dict[str, Any]] | None:
        """The master-key entries (those with an ``l``) of ``group``'s container, or None
        when the container is missing or hidden from this account."""
        container = self._container(group)

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
        """The entry whose ``l`` is ``key_id`` in the container of ``group``, or None."""
        try:
            conn.search(
                self._container(group),
                f"(&(objectClass={self._layout.key_class})({KEY_ID_ATTRIBUTE}={key_id}))",
                search_scope=ldap3.LEVEL,
                attributes=attributes,
            )
        except ldap_exc.LDAPNoSuchObjectResult:
            return None
        found = found_entries(conn)
        if len(found) > 1:
            raise DirectoryError(
                f"the DKM container {self._container(group)} at {self._link.endpoint} holds "
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
