"""Master keys in LDAP, in the shape of AD FS's DKM container.

Layout ``openldap`` (stock schema only: core, cosine, nis, inetorgperson; no
schema change on the server)::

    <directory.container>                       the DKM parent, made by the directory admin
    └── cn=<group guid>                         applicationProcess: one farm's DKM container
        ├── cn=<key guid>                       inetOrgPerson: one master key
        │     sn: farmkeys master key
        │     l: <key guid>                     the key id, where AD FS keeps it
        │     jpegPhoto: <32 random bytes>      the key, where AD FS uses thumbnailPhoto
        └── cn=CryptoPolicy                     inetOrgPerson
              sn: CryptoPolicy
              displayName: <key guid>           the current key, as AD FS names it

``jpegPhoto`` has the JPEG syntax, which OpenLDAP stores as an opaque octet
string without checking the content, so any 32 bytes go in and come back
unchanged (the tests prove it against a real slapd). Who may read what is the
directory's access control, ``docs/directory-setup.md``: the farm's service
account alone sees anything under the DKM parent. OpenLDAP hides an entry
from an account that may not read it, so "missing" and "not readable" look
alike from here and every message says both.

Layout ``ad`` (AD FS's own ``contact`` objects under
``CN=ADFS,CN=Microsoft,CN=Program Data``) is not implemented yet.

Key bytes and passwords never appear in a log line, an exception message or a
repr: keys and entries are named by their GUIDs and DNs only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import secrets
import ssl
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

import ldap3
from ldap3.core import exceptions as ldap_exc
from ldap3.utils.dn import parse_dn

from farmkeys._retry import RetryExhaustedError, call_with_retry
from farmkeys.config import DirectoryConfig, RetryConfig
from farmkeys.errors import (
    ConfigError,
    DirectoryAuthError,
    DirectoryError,
    FarmConflictError,
    MasterKeyMissingError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MASTER_KEY_LENGTH = 32
"""Bytes of one master key (AD FS's DKM keys are 256 bits too)."""

KEY_ATTRIBUTE = "jpegPhoto"
KEY_ID_ATTRIBUTE = "l"
KEY_SURNAME = "farmkeys master key"
POLICY_CN = "CryptoPolicy"
POLICY_ATTRIBUTE = "displayName"
CONTAINER_CLASSES = ("applicationProcess",)
KEY_CLASSES = ("inetOrgPerson",)

SUPPORTED_LAYOUTS = ("openldap",)
SETUP_DOC = "docs/directory-setup.md"

_GENERALIZED_TIME = re.compile(r"^(\d{14})(?:[.,]\d+)?Z$")

# Failures worth another attempt: the server is down, restarting, or slow.
_TRANSIENT_RESULTS = (ldap_exc.LDAPBusyResult, ldap_exc.LDAPUnavailableResult)
_CONNECTION_LOST = (ldap_exc.LDAPCommunicationError, ldap_exc.LDAPResponseTimeoutError)


@dataclass(frozen=True)
class MasterKeyInfo:
    """What ``farmkeys status`` may know about a master key: never the key itself."""

    id: uuid.UUID
    created_at: datetime | None
    current: bool


def _describe(exc: BaseException) -> str:
    """A short cause for a message: the LDAP result, or the socket error, never a value."""
    if isinstance(exc, ldap_exc.LDAPOperationResult):
        text = f"{exc.description} (result {exc.result})"
        if exc.message:
            text += f": {exc.message}"
        return text
    text = str(exc).strip()
    return text or type(exc).__name__


def _is_certificate_failure(exc: BaseException) -> bool:
    text = str(exc)
    return "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT_RESULTS):
        return True
    if isinstance(exc, _CONNECTION_LOST):
        return not _is_certificate_failure(exc)
    return False


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_generalized_time(value: str) -> datetime | None:
    match = _GENERALIZED_TIME.match(value.strip())
    if match is None:
        return None
    return datetime.strptime(match.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)


def _first(entry: dict[str, Any], attribute: str) -> bytes | None:
    """The first raw value of ``attribute`` in a search result entry, matched case-insensitively."""
    for name, values in entry.get("raw_attributes", {}).items():
        if name.lower() == attribute.lower() and values:
            value = values[0]
            return value if isinstance(value, bytes) else str(value).encode()
    return None


def _entries(conn: ldap3.Connection) -> list[dict[str, Any]]:
    return [r for r in (conn.response or []) if r.get("type") == "searchResEntry"]


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
        self._retry = retry
        self._use_ssl = self._validate(config)
        self._conn: ldap3.Connection = None
        self._lock = threading.RLock()
        self._keys: dict[tuple[uuid.UUID, uuid.UUID], bytes] = {}
        self._key_reads = 0
        self._warned_plaintext = False

    @staticmethod
    def _validate(config: DirectoryConfig) -> bool:
        """Check the configuration; returns whether the URL asks for LDAPS."""
        if config.layout == "ad":
            raise ConfigError(
                "directory.layout 'ad' (Active Directory, AD FS's own DKM layout) "
                "is not implemented yet",
                'use layout = "openldap"',
            )
        if config.layout not in SUPPORTED_LAYOUTS:
            raise ConfigError(
                f"directory.layout {config.layout!r} is not a known layout",
                f"use one of: {', '.join(SUPPORTED_LAYOUTS)}",
            )
        parts = urlsplit(config.url)
        if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
            raise ConfigError(
                f"directory.url {config.url!r} is not an ldap:// or ldaps:// URL with a host",
                "write it as ldap://host[:port] or ldaps://host[:port]",
            )
        try:
            _ = parts.port
        except ValueError:
            raise ConfigError(
                f"directory.url {config.url!r} has an invalid port",
                "write it as ldap://host[:port] or ldaps://host[:port]",
            ) from None
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(
                f"directory.url {config.url!r} has a path, query or fragment",
                "give only the scheme, host and port; the DNs are separate settings",
            )
        use_ssl = parts.scheme == "ldaps"
        if config.start_tls and use_ssl:
            raise ConfigError(
                "directory.start_tls is set with an ldaps:// URL",
                "use either ldaps:// or ldap:// with start_tls = true, not both",
            )
        if config.start_tls and not config.ca_file:
            raise ConfigError(
                "directory.start_tls is set but directory.ca_file is not",
                "set directory.ca_file to the CA certificate (PEM) that issued "
                "the directory server's certificate",
            )
        for setting, dn in (("bind_dn", config.bind_dn), ("container", config.container)):
            try:
                parse_dn(dn)
                valid = bool(dn.strip())
            except ldap_exc.LDAPException:
                valid = False
            if not valid:
                raise ConfigError(
                    f"directory.{setting} {dn!r} is not a distinguished name",
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
        return use_ssl

    def __repr__(self) -> str:
        return (
            f"Directory({self.endpoint!r}, bind_dn={self._config.bind_dn!r}, "
            f"layout={self._config.layout!r})"
        )

    # -- public API ---------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The directory's URL, for messages."""
        return self._config.url

    @property
    def key_reads(self) -> int:
        """How many master-key reads this object sent to the server."""
        return self._key_reads

    def bind(self) -> None:
        """Connect and bind now, so a bad URL or password fails before anything is written."""
        with self._lock:
            self._connection()

    def close(self) -> None:
        """Close the connection (a later operation opens a new one). Keeps the key cache."""
        with self._lock:
            self._drop()

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
        return self._exists(dn)

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
            self._remove_best_effort(reversed(created))
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
            return [str(e["dn"]) for e in _entries(conn)]

        dns = self._run(children)
        # Leaves first: the deeper a DN, the more RDNs it has.
        for dn in sorted(dns, key=lambda d: len(parse_dn(d)), reverse=True):
            self._delete(dn)
        if dns:
            with self._lock:
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
                self._remove_best_effort([dn])
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
        dn = self._key_dn(group, key_id)
        if self._exists(dn):
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
        self._delete(self._key_dn(group, key_id))
        self.forget(group, key_id)
        log.info("deleted master key %s of DKM group %s", key_id, group)

    def forget(self, group: uuid.UUID, key_id: uuid.UUID) -> None:
        """Drop a cached master key from memory (it was deleted from the directory)."""
        with self._lock:
            self._keys.pop((group, key_id), None)

    def restore_container(self, group: uuid.UUID, *, farm_name: str, current: uuid.UUID) -> bool:
        """Re-create the DKM container of ``group`` and its CryptoPolicy (naming ``current``)
        where they are missing, without any key. True when anything was created.

        The access rule that keeps the keys to the service account is the
        directory's, on the DKM parent (``docs/directory-setup.md``), so a
        re-created container falls under it as the first one did.
        """
        created = False
        container = self.container_dn(group)
        if not self._exists(container):
            self._add_container_entry(group, farm_name)
            created = True
        if not self._exists(self._policy_dn(group)):
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

        self._run(modify, writing=policy)

    def current_key_id(self, group: uuid.UUID) -> uuid.UUID:
        """The id of the current master key of ``group``, from its CryptoPolicy."""
        policy = self._policy_dn(group)

        def read(conn: ldap3.Connection) -> bytes | None:
            try:
                conn.search(policy, "(objectClass=*)", ldap3.BASE, attributes=[POLICY_ATTRIBUTE])
            except ldap_exc.LDAPNoSuchObjectResult:
                return None
            found = _entries(conn)
            return _first(found[0], POLICY_ATTRIBUTE) if found else None

        value = self._run(read)
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
        with self._lock:
            cached = self._keys.get((group, key_id))
            if cached is not None:
                return cached
            dn = self._key_dn(group, key_id)

            def read(conn: ldap3.Connection) -> bytes | None:
                self._key_reads += 1
                try:
                    conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=[KEY_ATTRIBUTE])
                except ldap_exc.LDAPNoSuchObjectResult:
                    return None
                found = _entries(conn)
                return _first(found[0], KEY_ATTRIBUTE) if found else None

            key = self._run(read)
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

        def search(conn: ldap3.Connection) -> list[dict[str, Any]] | None:
            try:
                conn.search(
                    container,
                    f"(&(objectClass=inetOrgPerson)({KEY_ID_ATTRIBUTE}=*))",
                    search_scope=ldap3.LEVEL,
                    attributes=[KEY_ID_ATTRIBUTE, "createTimestamp"],
                )
            except ldap_exc.LDAPNoSuchObjectResult:
                return None
            return _entries(conn)

        found = self._run(search)
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
            raw_id = _first(entry, KEY_ID_ATTRIBUTE)
            try:
                key_id = uuid.UUID(raw_id.decode("utf-8")) if raw_id else None
            except (UnicodeDecodeError, ValueError):
                key_id = None
            if key_id is None:
                log.warning("ignoring %s: its %s is not a key id", entry["dn"], KEY_ID_ATTRIBUTE)
                continue
            stamp = _first(entry, "createTimestamp")
            created = _parse_generalized_time(stamp.decode("ascii", "replace")) if stamp else None
            keys.append(MasterKeyInfo(id=key_id, created_at=created, current=key_id == current))
        far_past = datetime.min.replace(tzinfo=UTC)
        keys.sort(key=lambda k: (k.created_at or far_past, str(k.id)))
        return keys

    def anonymous_can_read(self, group: uuid.UUID) -> bool:
        """Whether an anonymous bind can see any master-key entry of ``group`` or its key.

        Looks both ways: a subtree search under the container, and a base read
        of every key the service account knows of (in case the container
        itself is hidden but its children are not).
        """
        container = self.container_dn(group)
        try:
            known = [self._key_dn(group, k.id) for k in self.list_keys(group)]
        except DirectoryError:
            known = []
        conn = self._open_anonymous()
        if conn is None:
            return False
        try:
            for base, scope in [(container, ldap3.SUBTREE), *((dn, ldap3.BASE) for dn in known)]:
                try:
                    conn.search(base, "(objectClass=*)", scope, attributes=[KEY_ATTRIBUTE])
                except ldap_exc.LDAPNoSuchObjectResult:
                    continue
                except ldap_exc.LDAPInsufficientAccessRightsResult:
                    continue
                for entry in _entries(conn):
                    if self._is_key_dn(str(entry["dn"]), container) or _first(entry, KEY_ATTRIBUTE):
                        return True
            return False
        except ldap_exc.LDAPException as exc:
            raise DirectoryError(
                f"the anonymous check of {container} at {self.endpoint} failed: {_describe(exc)}",
                "check that the directory is reachable",
            ) from exc
        finally:
            self._unbind(conn)

    # -- entries ------------------------------------------------------------------

    def _key_dn(self, group: uuid.UUID, key_id: uuid.UUID) -> str:
        return f"cn={key_id},{self.container_dn(group)}"

    def _policy_dn(self, group: uuid.UUID) -> str:
        return f"cn={POLICY_CN},{self.container_dn(group)}"

    @staticmethod
    def _is_key_dn(dn: str, container: str) -> bool:
        parts = parse_dn(dn)
        if len(parts) != len(parse_dn(container)) + 1:
            return False
        attr, value, _ = parts[0]
        return str(attr).lower() == "cn" and str(value).lower() != POLICY_CN.lower()

    def _add_container_entry(self, group: uuid.UUID, farm_name: str) -> str:
        dn = self.container_dn(group)
        self._add(
            dn,
            CONTAINER_CLASSES,
            {"cn": str(group), "description": f"farmkeys DKM container for farm {farm_name}"},
            creating_container=True,
        )
        return dn

    def _add_policy_entry(self, group: uuid.UUID, current: uuid.UUID) -> str:
        dn = self._policy_dn(group)
        self._add(
            dn, KEY_CLASSES, {"cn": POLICY_CN, "sn": POLICY_CN, POLICY_ATTRIBUTE: str(current)}
        )
        return dn

    def _add_key_entry(self, group: uuid.UUID, key_id: uuid.UUID, key: bytes | None = None) -> str:
        dn = self._key_dn(group, key_id)
        self._add(
            dn,
            KEY_CLASSES,
            {
                "cn": str(key_id),
                "sn": KEY_SURNAME,
                KEY_ID_ATTRIBUTE: str(key_id),
                KEY_ATTRIBUTE: key if key is not None else secrets.token_bytes(MASTER_KEY_LENGTH),
            },
        )
        return dn

    def _exists(self, dn: str) -> bool:
        def search(conn: ldap3.Connection) -> bool:
            try:
                conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=[ldap3.NO_ATTRIBUTES])
            except ldap_exc.LDAPNoSuchObjectResult:
                return False
            return bool(_entries(conn))

        return self._run(search)

    def _add(
        self,
        dn: str,
        classes: tuple[str, ...],
        attributes: dict[str, Any],
        *,
        creating_container: bool = False,
    ) -> None:
        def add(conn: ldap3.Connection) -> None:
            conn.add(dn, list(classes), attributes)

        try:
            self._run(add, writing=dn)
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
            raise

    def _delete(self, dn: str) -> None:
        def delete(conn: ldap3.Connection) -> None:
            with contextlib.suppress(ldap_exc.LDAPNoSuchObjectResult):
                conn.delete(dn)

        self._run(delete, writing=dn)

    def _remove_best_effort(self, dns: Iterable[str]) -> None:
        for dn in dns:
            try:
                self._delete(dn)
            except Exception as exc:  # undoing is best effort; the original error matters
                log.warning("could not remove %s while undoing a failed change: %s", dn, exc)
            else:
                log.info("removed %s after a failed change", dn)

    # -- connection ---------------------------------------------------------------

    def _run(self, operation: Callable[[Any], T], *, writing: str | None = None) -> T:
        """Run ``operation`` on the bound connection, re-opening it once if it was lost.

        LDAP errors become :class:`DirectoryError`; ``writing`` names the entry
        a write touches, for the message when access is denied.
        """
        with self._lock:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    return operation(conn)
                except _CONNECTION_LOST as exc:
                    self._drop()
                    if attempt == 2:
                        raise DirectoryError(
                            f"lost the connection to the directory at {self.endpoint} "
                            f"again right after reconnecting: {_describe(exc)}",
                            "check the directory server's health and the network",
                        ) from exc
                    log.warning(
                        "lost the connection to %s (%s); reconnecting",
                        self.endpoint,
                        _describe(exc),
                    )
                except ldap_exc.LDAPInsufficientAccessRightsResult as exc:
                    if writing is None:
                        raise DirectoryError(
                            f"the directory at {self.endpoint} denied {self._config.bind_dn} "
                            f"access: {_describe(exc)}",
                            f"grant the access {SETUP_DOC} shows",
                        ) from exc
                    raise DirectoryError(
                        f"the directory account {self._config.bind_dn} may not create entries "
                        f"under {self._config.container} (denied on {writing})",
                        f"grant it write access there as {SETUP_DOC} shows",
                    ) from exc
                except ldap_exc.LDAPException as exc:
                    target = f" on {writing}" if writing else ""
                    raise DirectoryError(
                        f"the directory at {self.endpoint} failed an operation{target}: "
                        f"{_describe(exc)}",
                        "check the directory server's log and the DKM container's state",
                    ) from exc
            raise AssertionError("unreachable")

    def _connection(self) -> ldap3.Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._drop()
        try:
            self._conn = call_with_retry(
                self._open,
                policy=self._retry,
                is_transient=_is_transient,
                what=f"directory {self.endpoint}",
            )
        except RetryExhaustedError as exc:
            raise DirectoryError(
                f"cannot reach the directory at {self.endpoint}: {_describe(exc.last)} "
                f"({exc.summary()})",
                "check directory.url, that the directory server runs, and the network "
                "between this node and it",
            ) from exc
        return self._conn

    def _server(self) -> ldap3.Server:
        tls = None
        if self._use_ssl or self._config.start_tls:
            ca_file = self._config.ca_file
            if ca_file is not None and not Path(ca_file).is_file():
                raise ConfigError(
                    f"directory.ca_file {ca_file} does not exist or is not a file",
                    "point it at the CA certificate (PEM) of the directory server",
                )
            tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file)
        return ldap3.Server(
            self._config.url,
            use_ssl=self._use_ssl,
            tls=tls,
            connect_timeout=self._config.timeout_seconds,
            get_info=ldap3.NONE,
        )

    def _open(self) -> ldap3.Connection:
        """One attempt to connect and bind as the service account."""
        password = self._config.read_password()
        conn = ldap3.Connection(
            self._server(),
            user=self._config.bind_dn,
            password=password,
            auto_bind=ldap3.AUTO_BIND_NONE,
            receive_timeout=self._config.timeout_seconds,
            raise_exceptions=True,
            read_only=False,
        )
        try:
            conn.open()
            if self._config.start_tls:
                conn.start_tls()
            conn.bind()
        except ldap_exc.LDAPInvalidCredentialsResult:
            self._unbind(conn)
            raise DirectoryAuthError(
                f"the directory at {self.endpoint} rejected the bind as "
                f"{self._config.bind_dn} (invalid credentials)",
                "check directory.password / password_file",
            ) from None
        except ldap_exc.LDAPException as exc:
            self._unbind(conn)
            if _is_transient(exc):
                raise
            raise DirectoryError(
                f"cannot bind to the directory at {self.endpoint} as "
                f"{self._config.bind_dn}: {_describe(exc)}",
                "check directory.url, start_tls and ca_file, and the account",
            ) from exc
        finally:
            # ldap3 keeps the password and shows it in the connection's repr.
            conn.password = None
        log.debug("bound to %s as %s", self.endpoint, self._config.bind_dn)
        if not (self._use_ssl or self._config.start_tls or self._warned_plaintext):
            self._warned_plaintext = True
            host = urlsplit(self._config.url).hostname or ""
            if not _is_loopback(host):
                log.warning(
                    "the directory at %s is reached without TLS: the bind password and the "
                    "master keys cross the network in the clear; use ldaps:// or start_tls",
                    self.endpoint,
                )
        return conn

    def _open_anonymous(self) -> ldap3.Connection | None:
        """An anonymous connection, or None when the server refuses anonymous binds."""

        def attempt() -> ldap3.Connection:
            conn = ldap3.Connection(
                self._server(),
                auto_bind=ldap3.AUTO_BIND_NONE,
                receive_timeout=self._config.timeout_seconds,
                raise_exceptions=True,
                read_only=True,
            )
            try:
                conn.open()
                if self._config.start_tls:
                    conn.start_tls()
                conn.bind()
            except BaseException:
                self._unbind(conn)
                raise
            return conn

        try:
            return call_with_retry(
                attempt,
                policy=self._retry,
                is_transient=_is_transient,
                what=f"directory {self.endpoint} (anonymous)",
            )
        except RetryExhaustedError as exc:
            raise DirectoryError(
                f"cannot reach the directory at {self.endpoint}: {_describe(exc.last)} "
                f"({exc.summary()})",
                "check directory.url, that the directory server runs, and the network",
            ) from exc
        except ldap_exc.LDAPOperationResult as exc:
            log.info("the directory at %s refuses anonymous binds: %s", self.endpoint, exc)
            return None
        except ldap_exc.LDAPException as exc:
            raise DirectoryError(
                f"cannot open an anonymous connection to {self.endpoint}: {_describe(exc)}",
                "check directory.url, start_tls and ca_file",
            ) from exc

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._unbind(conn)

    @staticmethod
    def _unbind(conn: ldap3.Connection) -> None:
        try:
            conn.unbind()
        except Exception as exc:  # closing a dead socket may fail; nothing to do about it
            log.debug("ignoring an error while closing an LDAP connection: %s", exc)
