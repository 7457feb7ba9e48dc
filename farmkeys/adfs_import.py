"""`farmkeys import adfs`: bring an AD FS farm's own certificate into farmkeys.

The input is a certificate's ``EncryptedPfx`` (read by :mod:`farmkeys.adfs`)
and the DKM key it is sealed under: from a file, or found in the directory
(an AD FS DKM container under ``directory.container``, by the key id the
blob names, or, failing that, every key there: the MAC decides). The
certificate is checked here, so a refusal costs nothing, then handed to the
leader sealed under this farm's master key through the request table; the
leader checks it again and writes its row under the fence
(:meth:`farmkeys.leader.Leader.answer_requests`). Relying parties keep
trusting the same certificate: its key and thumbprint do not change.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import uuid
from datetime import datetime
from pathlib import Path

from farmkeys import policy
from farmkeys.config import Config
from farmkeys.db import ConfigDB
from farmkeys.directory import MASTER_KEY_LENGTH, Directory
from farmkeys.errors import AdfsKeyMismatchError, ImportRefusedError
from farmkeys.file_trust import read_private_file
from farmkeys.formats import adfs_pfx, certificates
from farmkeys.formats import blob as blob_format
from farmkeys.formats import request as request_format
from farmkeys.formats.blob import blob_context
from farmkeys.requesting import RolloverOutcome, await_answer, file_request
from farmkeys.vocab import PURPOSES

log = logging.getLogger(__name__)

ROLES = ("secondary", "primary")


def read_dkm_key_file(path: Path) -> bytes:
    """The 32-byte DKM key in ``path`` (hex or base64), refusing a file others may read."""
    raw = read_private_file(path, what="DKM key file", error=ImportRefusedError, limit=4096)
    text = raw.decode("ascii", "replace").strip()
    key = _decode_key(text)
    if key is None:
        raise ImportRefusedError(
            f"the DKM key file {path} does not hold a {MASTER_KEY_LENGTH}-byte key as hex "
            "or base64",
            f"write the key as {2 * MASTER_KEY_LENGTH} hex digits or as base64",
        )
    return key


def _decode_key(text: str) -> bytes | None:
    compact = "".join(text.split())
    candidates = []
    if len(compact) == 2 * MASTER_KEY_LENGTH:
        with contextlib.suppress(ValueError):
            candidates.append(bytes.fromhex(compact))
    with contextlib.suppress(binascii.Error, ValueError):
        candidates.append(base64.b64decode(compact, validate=True))
    return next((k for k in candidates if len(k) == MASTER_KEY_LENGTH), None)


def open_encrypted_pfx(
    data: bytes, *, directory: Directory, key_file: Path | None
) -> tuple[bytes, adfs_pfx.EncryptedPfx, str]:
    """The PKCS#12 inside an ``EncryptedPfx``, the parsed blob, and where its key came from."""
    blob = adfs_pfx.parse(data)
    if key_file is not None:
        keys = [(str(key_file), read_dkm_key_file(key_file))]
    else:
        keys = directory.find_keys(blob.key_id)
        if not keys:
            raise ImportRefusedError(
                f"no DKM key is readable under {directory.container} at {directory.endpoint} "
                f"(the EncryptedPfx names key {blob.key_id})",
                "give the key with --dkm-key-file, or let the service account read AD FS's "
                "DKM container",
            )
    for where, key in keys:
        try:
            return adfs_pfx.decrypt(blob, key), blob, where
        except AdfsKeyMismatchError:
            log.debug("DKM key at %s does not open the EncryptedPfx", where)
    raise AdfsKeyMismatchError(
        f"the EncryptedPfx's MAC verifies under none of the {len(keys)} DKM key(s) tried "
        f"(it names key {blob.key_id}): wrong key, or the blob was altered",
        "give the DKM key of the AD FS farm that exported it (--dkm-key-file)",
    )


def import_adfs(
    config: Config,
    db: ConfigDB,
    directory: Directory,
    *,
    encrypted_pfx: bytes,
    purpose: str,
    role: str,
    key_file: Path | None,
    now: datetime,
    timeout_seconds: float,
    reason: str | None = None,
) -> RolloverOutcome:
    """Check an AD FS certificate and have the leader add it to the farm as ``role``
    (``reason``: the operator's `--reason`, signed with the request and audited)."""
    if purpose not in PURPOSES or role not in ROLES:
        raise ValueError(f"purpose {purpose!r} or role {role!r} is not one farmkeys knows")
    farm = db.require_farm()
    pkcs12, blob, where = open_encrypted_pfx(encrypted_pfx, directory=directory, key_file=key_file)
    generated = certificates.from_pkcs12(pkcs12)
    cert = generated.certificate
    certificates.check_importable(cert, generated.key, purpose=purpose, now=now)
    thumb = certificates.thumbprint(cert)
    conflict = db.import_conflict(thumbprint=thumb, purpose=purpose, role=role)
    if conflict is not None:
        raise ImportRefusedError(
            conflict,
            "nothing was imported; `farmkeys status` lists the farm's certificates (import"
            " with --role primary, or after the secondary was promoted)",
        )
    current = policy.current_key(db.master_keys())
    key_id = current.id if current is not None else directory.current_key_id(farm.dkm_group)
    certificate_id = uuid.uuid4()
    sealed = blob_format.seal(
        pkcs12,
        master_key=directory.master_key(farm.dkm_group, key_id),
        master_key_id=key_id,
        context=blob_context(farm.dkm_group, certificate_id, purpose),
    )
    source = f"AD FS (DKM key {blob.key_id})"
    log.info("importing %s certificate %s from %s, key from %s", purpose, thumb, source, where)
    terms = request_format.ImportTerms(
        certificate=certificate_id,
        role=role,
        source=source,
        blob_sha256=request_format.blob_digest(sealed),
    )
    request = file_request(
        config,
        db,
        directory,
        kind="import",
        purpose=purpose,
        urgent=False,
        lifetime_seconds=timeout_seconds,
        import_=(terms, sealed),
        reason=reason,
    )
    return await_answer(config, db, directory, request, timeout_seconds=timeout_seconds)
