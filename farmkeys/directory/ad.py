"""The ``ad`` layout: AD FS's own DKM container on Active Directory.

::

    CN=<group guid>          container, with a protected DACL (below)
    CN=<key guid>            contact: l = key id, thumbnailPhoto = the 32 key bytes
    CN=CryptoPolicy          contact: displayName = the current key's id

Any authenticated user of a domain may read a contact's ``thumbnailPhoto``
by default, which is how a Golden SAML attack starts. So the farm's
container is created with its own security descriptor, inheritance from the
parent blocked: the service account, Domain Admins and SYSTEM have full
control, and nobody else has any right, so the keys are not even listed to
them. The descriptor travels in the same LDAP add that creates the
container, so there is no moment in which the container exists readable.
"""

from __future__ import annotations

from farmkeys.directory import security_descriptor as sd
from farmkeys.directory.layout import Layout

AD = Layout(
    name="ad",
    container_classes=("container",),
    key_classes=("contact",),
    key_attribute="thumbnailPhoto",
    created_attribute="whenCreated",
    requires_tls=True,
    protects_container=True,
)

SECURITY_DESCRIPTOR_ATTRIBUTE = "nTSecurityDescriptor"
DACL_SECURITY_INFORMATION = 0x04
"""The SD_FLAGS control value that reads and writes the DACL alone."""


def container_aces(service_sid: str) -> tuple[sd.Ace, ...]:
    """The farm container's DACL: full control for Domain Admins, SYSTEM and the service
    account, inherited by the keys; nothing for anyone else."""
    domain_admins = f"{sd.domain_of(service_sid)}-{sd.DOMAIN_ADMINS_RID}"
    return (sd.allow(domain_admins), sd.allow(sd.LOCAL_SYSTEM), sd.allow(service_sid))


def container_descriptor(service_sid: str) -> bytes:
    """The binary, self-relative, protected security descriptor of a farm container."""
    return sd.encode_dacl_descriptor(container_aces(service_sid), protected=True)


def descriptor_problem(raw: bytes | None, service_sid: str) -> str | None:
    """Why the container's descriptor, as read back, would let someone else read the keys;
    None when it is the one farmkeys writes (or grants only the same three principals)."""
    if raw is None:
        return "its security descriptor cannot be read"
    try:
        found = sd.decode_descriptor(raw)
    except sd.DescriptorError as exc:
        return f"its security descriptor does not parse ({exc})"
    if not found.protected:
        return "its DACL inherits from the parent (not protected)"
    allowed = {ace.sid for ace in container_aces(service_sid)}
    others = sorted(sd.readers(found) - allowed)
    if others:
        return f"its DACL lets {', '.join(others)} read"
    return None
