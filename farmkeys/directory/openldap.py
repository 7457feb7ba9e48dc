"""The ``openldap`` layout: AD FS's tree in classes that OpenLDAP's stock schema has.

No schema change on the server (core, cosine, nis, inetorgperson)::

    cn=<group guid>          applicationProcess
    cn=<key guid>            inetOrgPerson: sn, l = key id, jpegPhoto = the 32 key bytes
    cn=CryptoPolicy          inetOrgPerson: sn, displayName = the current key's id

``jpegPhoto`` has the JPEG syntax, which OpenLDAP stores as an opaque octet
string without checking the content, so any 32 bytes go in and come back
unchanged (the tests prove it against a real slapd). Who may read what is
the server's access control on the DKM parent (``docs/directory-setup.md``).
"""

from __future__ import annotations

from farmkeys.directory.layout import KEY_SURNAME, POLICY_CN, Layout

OPENLDAP = Layout(
    name="openldap",
    container_classes=("applicationProcess",),
    key_classes=("inetOrgPerson",),
    key_attribute="jpegPhoto",
    created_attribute="createTimestamp",
    key_extra={"sn": KEY_SURNAME},
    policy_extra={"sn": POLICY_CN},
)
