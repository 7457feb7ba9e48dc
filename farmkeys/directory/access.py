"""Who may read the farm's master keys: the descriptor a new entry carries on Active
Directory, the check that reads the descriptors back, and the anonymous-read check.

On the ``ad`` layout every entry farmkeys adds (the container, each key, CryptoPolicy)
carries its own protected security descriptor (:mod:`farmkeys.directory.ad`), written in
the same add with the SD_FLAGS control, so no schema default applies to it. On
``openldap`` the server's access rule on the DKM parent decides (``docs/directory-setup.md``)
and nothing is written here. On both, :meth:`Access.anonymous_can_read` binds anonymously
and looks.
"""

from __future__ import annotations

import logging
from typing import Any

import ldap3
from ldap3.core import exceptions as ldap_exc
from ldap3.protocol.microsoft import security_descriptor_control
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn

from farmkeys.config import DirectoryConfig
from farmkeys.directory import ad
from farmkeys.directory import security_descriptor as sd
from farmkeys.directory.connection import (
    SETUP_DOC,
    Connection,
    describe,
    first_value,
    found_entries,
)
from farmkeys.directory.layout import POLICY_CN, Layout
from farmkeys.directory.settings import UPN
from farmkeys.errors import DirectoryError

log = logging.getLogger(__name__)


class Access:
    """The access checks of one Directory, over its :class:`Connection`; the service
    account's objectSid is read once and kept."""

    def __init__(self, link: Connection, config: DirectoryConfig, layout: Layout) -> None:
        self._link = link
        self._config = config
        self._layout = layout
        self._service_sid: str | None = None

    def service_sid(self) -> str:
        """The objectSid of the service account (Active Directory), read once per object."""
        if self._service_sid is not None:
            return self._service_sid
        who = self._config.bind_dn
        if UPN.match(who):
            base = ",".join(
                f"{attr}={value}"
                for attr, value, _ in parse_dn(self._config.container)
                if str(attr).lower() == "dc"
            )
            query = (base, f"(userPrincipalName={escape_filter_chars(who)})", ldap3.SUBTREE)
        else:
            query = (who, "(objectClass=*)", ldap3.BASE)

        def read(conn: ldap3.Connection) -> bytes | None:
            try:
                conn.search(*query, attributes=["objectSid"])
            except ldap_exc.LDAPNoSuchObjectResult:
                return None
            found = found_entries(conn)
            return first_value(found[0], "objectSid") if len(found) == 1 else None

        raw = self._link.run(read)
        try:
            sid = sd.sid_from_bytes(raw)[0] if raw else None
        except sd.DescriptorError:
            sid = None
        if sid is None:
            raise DirectoryError(
                f"cannot read the objectSid of {who} at {self._link.endpoint}",
                "check directory.bind_dn (the service account's DN or user principal name)",
            )
        self._service_sid = sid
        return sid

    def new_entry_protection(self) -> tuple[dict[str, Any], list[Any] | None]:
        """The attributes and controls that give a new entry its own protected descriptor
        (``ad``: the container, every key and CryptoPolicy), so no schema default, such as a
        contact's read access for Authenticated Users, applies to it; none on ``openldap``."""
        if not self._layout.protects_container:
            return {}, None
        descriptor = ad.container_descriptor(self.service_sid())
        controls = security_descriptor_control(sdflags=ad.DACL_SECURITY_INFORMATION)
        return {ad.SECURITY_DESCRIPTOR_ATTRIBUTE: descriptor}, controls

    def container_problem(self, container: str) -> str | None:
        """On the ``ad`` layout: why the container ``container``, or an entry in it, would
        let someone other than the service account, Domain Admins and SYSTEM read the keys;
        None when every descriptor is the protected one farmkeys writes (always None on
        ``openldap``, whose access rule is the server's)."""
        if not self._layout.protects_container:
            return None
        control = security_descriptor_control(sdflags=ad.DACL_SECURITY_INFORMATION)

        def read(conn: ldap3.Connection) -> list[tuple[str, bytes | None]]:
            try:
                conn.search(
                    container,
                    "(objectClass=*)",
                    ldap3.SUBTREE,
                    attributes=[ad.SECURITY_DESCRIPTOR_ATTRIBUTE],
                    controls=control,
                )
            except ldap_exc.LDAPNoSuchObjectResult:
                return []
            return [
                (str(e["dn"]), first_value(e, ad.SECURITY_DESCRIPTOR_ATTRIBUTE))
                for e in found_entries(conn)
            ]

        found = self._link.run(read)
        if not found:
            return "its security descriptor cannot be read"
        service = self.service_sid()
        for dn, raw in found:
            problem = ad.descriptor_problem(raw, service)
            if problem is not None:
                return problem if dn.lower() == container.lower() else f"{dn}: {problem}"
        return None

    def delegation_hint(self) -> str:
        """What a domain admin must grant so ``init`` can protect the farm's container."""
        sid = self._service_sid or "<the account's objectSid>"
        return (
            f"a domain admin must give {self._config.bind_dn} full control of "
            f"{self._config.container} (Samba: samba-tool dsacl set "
            f'--objectdn="{self._config.container}" --trusteedn="<the account\'s DN>" '
            f'--sddl="(A;CI;GA;;;{sid})"; '
            f'Windows: dsacls "{self._config.container}" /I:T /G "<DOMAIN>\\<account>:GA"); '
            f"see {SETUP_DOC}"
        )

    def anonymous_can_read(self, container: str, known: list[str]) -> bool:
        """Whether an anonymous bind can see any master-key entry of ``container`` or its key.

        Looks both ways: a subtree search under the container, and a base read
        of every key entry in ``known`` (the DNs the service account sees), in case
        the container itself is hidden but its children are not.
        """
        key_attribute = self._layout.key_attribute
        conn = self._link.open_anonymous()
        if conn is None:
            return False
        try:
            for base, scope in [(container, ldap3.SUBTREE), *((dn, ldap3.BASE) for dn in known)]:
                try:
                    conn.search(base, "(objectClass=*)", scope, attributes=[key_attribute])
                except ldap_exc.LDAPNoSuchObjectResult:
                    continue
                except (
                    ldap_exc.LDAPInsufficientAccessRightsResult,
                    # Active Directory: "Operation unavailable without authentication".
                    ldap_exc.LDAPOperationsErrorResult,
                    ldap_exc.LDAPStrongerAuthRequiredResult,
                ):
                    continue
                for entry in found_entries(conn):
                    dn = str(entry["dn"])
                    if _is_key_dn(dn, container) or first_value(entry, key_attribute):
                        return True
            return False
        except ldap_exc.LDAPException as exc:
            raise DirectoryError(
                f"the anonymous check of {container} at {self._link.endpoint} failed: "
                f"{describe(exc)}",
                "check that the directory is reachable",
            ) from exc
        finally:
            self._link.unbind(conn)


def _is_key_dn(dn: str, container: str) -> bool:
    """Whether ``dn`` names an entry right under ``container`` other than CryptoPolicy."""
    parts = parse_dn(dn)
    if len(parts) != len(parse_dn(container)) + 1:
        return False
    attr, value, _ = parts[0]
    return str(attr).lower() == "cn" and str(value).lower() != POLICY_CN.lower()
