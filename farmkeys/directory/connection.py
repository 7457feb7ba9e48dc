"""The connection to the directory: the list of servers, TLS, the bind, retries and failover.

:class:`Connection` holds one bound ldap3 connection at a time, to the first server of
``directory.url`` that binds, and runs every operation of a
:class:`~farmkeys.directory.Directory` on it. A server that does not answer (or whose
certificate does not verify) is passed over for the next; a rejected password is not,
so an account is not locked out by trying it everywhere. A whole pass over the list is
retried on transient failures within ``retry``; a connection lost mid-operation is
re-opened once and the operation repeated. LDAP errors leave here as
:class:`~farmkeys.errors.DirectoryError` with a one-line cause (:func:`describe`).

ldap3 keeps the bind password in a connection and shows it in the connection's repr:
it is cleared right after the bind, and no message here ever carries a value read.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import ldap3
from ldap3.core import exceptions as ldap_exc
from ldap3.utils.dn import parse_dn

from farmkeys._retry import RetryExhaustedError, call_with_retry
from farmkeys.config import DirectoryConfig, RetryConfig
from farmkeys.directory.settings import is_ldaps, is_loopback
from farmkeys.errors import (
    ConfigError,
    DirectoryAuthError,
    DirectoryError,
    DirectoryUnreachableError,
)
from farmkeys.file_trust import check_file

log = logging.getLogger(__name__)

T = TypeVar("T")

SETUP_DOC = "docs/directory-setup.md"
"""What a directory administrator follows; the messages that need an admin name it."""

# Failures worth another attempt: the server is down, restarting, or slow.
_TRANSIENT_RESULTS = (ldap_exc.LDAPBusyResult, ldap_exc.LDAPUnavailableResult)
_CONNECTION_LOST = (ldap_exc.LDAPCommunicationError, ldap_exc.LDAPResponseTimeoutError)


def describe(exc: BaseException) -> str:
    """A short cause for a message: the LDAP result, or the socket error, never a value."""
    if isinstance(exc, ldap_exc.LDAPOperationResult):
        text = f"{exc.description} (result {exc.result})"
        if exc.message:
            text += f": {exc.message}"
    else:
        text = str(exc)
    # Servers end their diagnostic messages with newlines (Samba does): one line, always.
    return " ".join(text.split()) or type(exc).__name__


def _is_certificate_failure(exc: BaseException) -> bool:
    text = str(exc)
    return "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT_RESULTS):
        return True
    if isinstance(exc, _CONNECTION_LOST):
        return not _is_certificate_failure(exc)
    return False


def parses_as_dn(dn: str) -> bool:
    """Whether ldap3's parser takes ``dn`` as a distinguished name (the full check)."""
    try:
        parse_dn(dn)
    except ldap_exc.LDAPException:
        return False
    return True


def first_value(entry: dict[str, Any], attribute: str) -> bytes | None:
    """The first raw value of ``attribute`` in a search result entry, matched case-insensitively."""
    for name, values in entry.get("raw_attributes", {}).items():
        if name.lower() == attribute.lower() and values:
            value = values[0]
            return value if isinstance(value, bytes) else str(value).encode()
    return None


def found_entries(conn: ldap3.Connection) -> list[dict[str, Any]]:
    """The entries the last search on ``conn`` returned (not its referrals)."""
    return [r for r in (conn.response or []) if r.get("type") == "searchResEntry"]


def _server(url: str, config: DirectoryConfig) -> ldap3.Server:
    """The ldap3 server of ``url``: TLS (the CA verified) for ldaps:// or StartTLS."""
    use_ssl = is_ldaps(url)
    tls = None
    if use_ssl or config.start_tls:
        ca_file = config.ca_file
        if ca_file is not None and not Path(ca_file).is_file():
            raise ConfigError(
                f"directory.ca_file {ca_file} does not exist or is not a file",
                "point it at the CA certificate (PEM) of the directory server",
            )
        if ca_file is not None:
            # Whoever could change it could vouch for their own server, and collect the
            # bind password: it and the folders above it must be root's or this account's.
            try:
                check_file(ca_file, what="directory.ca_file")
            except OSError as exc:
                raise ConfigError(
                    f"cannot check directory.ca_file {ca_file}: {exc.strerror}",
                    "check the path and that the service account can read it",
                ) from None
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file)
    return ldap3.Server(
        url,
        use_ssl=use_ssl,
        tls=tls,
        connect_timeout=config.timeout_seconds,
        get_info=ldap3.NONE,
    )


class Connection:
    """The bound connection to the directory, shared by every operation of one Directory.

    Construction does no I/O; the first operation connects and binds. :attr:`lock`
    serialises the operations (the master-key cache shares it, so a key is read once).
    """

    def __init__(self, config: DirectoryConfig, retry: RetryConfig) -> None:
        self._config = config
        self._retry = retry
        self._conn: ldap3.Connection = None
        self._server_url: str | None = None
        self._warned_plaintext = False
        self.lock = threading.RLock()

    @property
    def endpoint(self) -> str:
        """The directory server in use (or, before the first bind, the list), for messages."""
        return self._server_url or ", ".join(self._config.urls)

    @property
    def last_server(self) -> str | None:
        """The URL of the server (domain controller) last bound to, if any."""
        return self._server_url

    @property
    def current(self) -> ldap3.Connection | None:
        """The ldap3 connection now open, if any."""
        return self._conn

    def bind(self) -> None:
        """Connect and bind now, unless a connection is open."""
        with self.lock:
            self._connection()

    def close(self) -> None:
        """Close the connection (a later operation opens a new one)."""
        with self.lock:
            self._drop()

    def run(self, operation: Callable[[Any], T], *, writing: str | None = None) -> T:
        """Run ``operation`` on the bound connection, re-opening it once if it was lost.

        LDAP errors become :class:`DirectoryError`; ``writing`` names the entry
        a write touches, for the message when access is denied.
        """
        with self.lock:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    return operation(conn)
                except _CONNECTION_LOST as exc:
                    self._drop()
                    if attempt == 2:
                        raise DirectoryUnreachableError(
                            f"lost the connection to the directory at {self.endpoint} "
                            f"again right after reconnecting: {describe(exc)}",
                            "check the directory server's health and the network",
                        ) from exc
                    log.warning(
                        "lost the connection to %s (%s); reconnecting",
                        self.endpoint,
                        describe(exc),
                    )
                except ldap_exc.LDAPInsufficientAccessRightsResult as exc:
                    raise self._denied(exc, writing) from exc
                except ldap_exc.LDAPException as exc:
                    target = f" on {writing}" if writing else ""
                    raise DirectoryError(
                        f"the directory at {self.endpoint} failed an operation{target}: "
                        f"{describe(exc)}",
                        "check the directory server's log and the DKM container's state",
                    ) from exc
            raise AssertionError("unreachable")

    def _denied(self, exc: BaseException, writing: str | None) -> DirectoryError:
        if writing is None:
            return DirectoryError(
                f"the directory at {self.endpoint} denied {self._config.bind_dn} "
                f"access: {describe(exc)}",
                f"grant the access {SETUP_DOC} shows",
            )
        return DirectoryError(
            f"the directory account {self._config.bind_dn} may not create entries "
            f"under {self._config.container} (denied on {writing})",
            f"grant it write access there as {SETUP_DOC} shows",
        )

    # -- the operations every part uses -------------------------------------------------

    def exists(self, dn: str) -> bool:
        """Whether the entry ``dn`` exists and this account can see it."""

        def search(conn: ldap3.Connection) -> bool:
            try:
                conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=[ldap3.NO_ATTRIBUTES])
            except ldap_exc.LDAPNoSuchObjectResult:
                return False
            return bool(found_entries(conn))

        return self.run(search)

    def add(
        self,
        dn: str,
        classes: tuple[str, ...],
        attributes: dict[str, Any],
        *,
        controls: list[Any] | None = None,
    ) -> None:
        """Add the entry ``dn``; a :class:`DirectoryError` from LDAP's refusal keeps it as
        its ``__cause__``."""

        def add(conn: ldap3.Connection) -> None:
            conn.add(dn, list(classes), attributes, controls=controls)

        self.run(add, writing=dn)

    def delete(self, dn: str) -> None:
        """Delete the entry ``dn``; a no-op when it is gone."""

        def delete(conn: ldap3.Connection) -> None:
            with contextlib.suppress(ldap_exc.LDAPNoSuchObjectResult):
                conn.delete(dn)

        self.run(delete, writing=dn)

    def delete_tree(self, dn: str) -> bool:
        """Delete ``dn`` and every entry under it, leaves first; False when none was there."""

        def subtree(conn: ldap3.Connection) -> list[str]:
            try:
                conn.search(
                    dn,
                    "(objectClass=*)",
                    search_scope=ldap3.SUBTREE,
                    attributes=[ldap3.NO_ATTRIBUTES],
                )
            except ldap_exc.LDAPNoSuchObjectResult:
                return []
            return [str(e["dn"]) for e in found_entries(conn)]

        dns = self.run(subtree)
        # Leaves first: the deeper a DN, the more RDNs it has.
        for entry in sorted(dns, key=lambda d: len(parse_dn(d)), reverse=True):
            self.delete(entry)
        return bool(dns)

    def remove_best_effort(self, dns: Iterable[str]) -> None:
        """Delete ``dns`` in order while undoing a failed change, logging what fails."""
        for dn in dns:
            try:
                self.delete(dn)
            except Exception as exc:  # undoing is best effort; the original error matters
                log.warning("could not remove %s while undoing a failed change: %s", dn, exc)
            else:
                log.info("removed %s after a failed change", dn)

    def open_anonymous(self) -> ldap3.Connection | None:
        """An anonymous connection to the server in use (or the first listed), or None when
        the server refuses anonymous binds. The caller unbinds it (:meth:`unbind`)."""
        url = self._server_url or self._config.urls[0]
        try:
            return self._retrying(lambda: self._open_one(url, anonymous=True), url)
        except ldap_exc.LDAPOperationResult as exc:
            log.info("the directory at %s refuses anonymous binds: %s", url, exc)
            return None
        except ldap_exc.LDAPException as exc:
            raise DirectoryError(
                f"cannot open an anonymous connection to {url}: {describe(exc)}",
                "check directory.url, start_tls and ca_file",
            ) from exc

    @staticmethod
    def unbind(conn: ldap3.Connection) -> None:
        """Close ``conn``, ignoring the errors of a dead socket."""
        try:
            conn.unbind()
        except Exception as exc:  # closing a dead socket may fail; nothing to do about it
            log.debug("ignoring an error while closing an LDAP connection: %s", exc)

    # -- connecting ----------------------------------------------------------------------

    def _connection(self) -> ldap3.Connection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        self._drop()
        self._conn = self._retrying(self._open, ", ".join(self._config.urls))
        return self._conn

    def _retrying(self, attempt: Callable[[], ldap3.Connection], where: str) -> ldap3.Connection:
        """``attempt()``, retried on transient failures within ``retry``; the exhausted
        budget becomes a :class:`DirectoryError` naming ``where``."""
        try:
            return call_with_retry(
                attempt, policy=self._retry, is_transient=_is_transient, what=f"directory {where}"
            )
        except RetryExhaustedError as exc:
            raise DirectoryUnreachableError(
                f"cannot reach the directory at {where}: {describe(exc.last)} ({exc.summary()})",
                "check directory.url, that the directory server runs, and the network "
                "between this node and it",
            ) from exc

    def _open(self) -> ldap3.Connection:
        """One pass over the servers, in order: the first that binds is used.

        When every server failed, the last transient failure is raised for another
        pass, else the first server's error.
        """
        failures: list[BaseException] = []
        for url in self._config.urls:
            try:
                conn = self._open_one(url, anonymous=False)
            except DirectoryAuthError:
                raise
            except (ldap_exc.LDAPException, DirectoryError) as exc:
                failures.append(exc)
                if len(self._config.urls) > 1:
                    log.warning("directory server %s failed: %s", url, describe(exc))
                continue
            if self._server_url not in (None, url):
                log.warning("the directory is now reached at %s", url)
            self._server_url = url
            return conn
        transient = [f for f in failures if _is_transient(f)]
        raise transient[-1] if transient else failures[0]

    def _open_one(self, url: str, *, anonymous: bool) -> ldap3.Connection:
        """One attempt to connect to ``url`` and bind as the service account (or anonymously)."""
        who = "anonymously" if anonymous else f"as {self._config.bind_dn}"
        conn = ldap3.Connection(
            _server(url, self._config),
            user=None if anonymous else self._config.bind_dn,
            password=None if anonymous else self._config.read_password(),
            auto_bind=ldap3.AUTO_BIND_NONE,
            receive_timeout=self._config.timeout_seconds,
            raise_exceptions=True,
            read_only=anonymous,
        )
        try:
            conn.open()
            if self._config.start_tls:
                conn.start_tls()
            conn.bind()
        except ldap_exc.LDAPInvalidCredentialsResult:
            self.unbind(conn)
            raise DirectoryAuthError(
                f"the directory at {url} rejected the bind {who} (invalid credentials)",
                "check directory.password / password_file",
            ) from None
        except ldap_exc.LDAPException as exc:
            self.unbind(conn)
            if _is_transient(exc) or anonymous:
                raise
            raise DirectoryError(
                f"cannot bind to the directory at {url} {who}: {describe(exc)}",
                "check directory.url, start_tls and ca_file, and the account",
            ) from exc
        finally:
            # ldap3 keeps the password and shows it in the connection's repr.
            conn.password = None
        log.debug("bound to %s %s", url, who)
        self._warn_if_plaintext(url)
        return conn

    def _warn_if_plaintext(self, url: str) -> None:
        """Once per object: a warning when ``url`` is reached without TLS off this machine."""
        if not (is_ldaps(url) or self._config.start_tls or self._warned_plaintext):
            self._warned_plaintext = True
            if not is_loopback(urlsplit(url).hostname or ""):
                log.warning(
                    "the directory at %s is reached without TLS: the bind password and the "
                    "master keys cross the network in the clear; use ldaps:// or start_tls",
                    url,
                )

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self.unbind(conn)
