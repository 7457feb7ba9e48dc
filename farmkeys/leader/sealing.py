"""The one writer of sealed certificates: a key and certificate made, packed as the
files a node writes, and sealed under a master key, bound to the row that holds it.

`init` uses it for a farm's first certificates; the leader for every later one, for an
imported one, and to seal a live blob again under a new master key. Making a key is the
slow part of a rollover, so the leader makes it before it opens a fenced transaction
(:class:`Spares`), while the lease row is not locked.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from farmkeys import policy
from farmkeys.config import Config
from farmkeys.db import CertificateRow, ConfigDB, Farm, NewCertificate, Transaction
from farmkeys.directory import Directory
from farmkeys.formats import blob as blob_format
from farmkeys.formats import bundle, certificates
from farmkeys.formats.blob import blob_context

CLOCK_SKEW_ALLOWANCE = timedelta(hours=1)
"""A new certificate is valid from this long before it is made, so a relying party whose
clock runs slow accepts it as soon as it is promoted. Its end is ``certificate_duration``
after it is made, so the rollover schedule is unchanged."""

# A key made before a fenced transaction is used only this soon after: its certificate's
# validity starts from when it was made.
SPARE_FRESHNESS = timedelta(minutes=10)


def generate_certificate(config: Config, *, purpose: str, now: datetime) -> certificates.Generated:
    """A new key and certificate for ``purpose``, valid from ``now`` less the clock-skew
    allowance for the policy's certificate duration. The costly part of a rollover: the
    leader does it before it opens a fenced transaction."""
    start = now.replace(microsecond=0)
    return certificates.generate(
        farm_name=config.farm.name,
        purpose=purpose,
        key_type=config.policy.key_for(purpose),
        not_before=start - CLOCK_SKEW_ALLOWANCE,
        not_after=start + config.policy.units(config.policy.certificate_duration),
    )


def new_certificate(
    config: Config,
    *,
    dkm_group: uuid.UUID,
    purpose: str,
    role: str,
    master_key_id: uuid.UUID,
    master_key: bytes,
    now: datetime,
) -> NewCertificate:
    """Generate a key and certificate for ``purpose`` and seal it, ready for its row."""
    generated = generate_certificate(config, purpose=purpose, now=now)
    return sealed_certificate(
        config,
        dkm_group=dkm_group,
        certificate_id=uuid.uuid4(),
        purpose=purpose,
        role=role,
        generated=generated,
        master_key_id=master_key_id,
        master_key=master_key,
    )


def sealed_certificate(
    config: Config,
    *,
    dkm_group: uuid.UUID,
    certificate_id: uuid.UUID,
    purpose: str,
    role: str,
    generated: certificates.Generated,
    master_key_id: uuid.UUID,
    master_key: bytes,
) -> NewCertificate:
    """A certificate and its key sealed under a master key, as its row will hold them."""
    cert = generated.certificate
    thumb = certificates.thumbprint(cert)
    # The exact bytes each node writes (farmkeys.bundle): a node checks them cheaply and
    # never parses a PKCS#12 or re-encodes the key.
    packed = bundle.pack(generated, friendly_name=f"{config.farm.name} token {purpose} {thumb}")
    blob = blob_format.seal(
        packed,
        master_key=master_key,
        master_key_id=master_key_id,
        context=blob_context(dkm_group, certificate_id, purpose),
    )
    return NewCertificate(
        id=certificate_id,
        purpose=purpose,
        role=role,
        thumbprint=thumb,
        sha256=certificates.sha256_fingerprint(cert),
        subject=cert.subject.rfc4514_string(),
        key_type=certificates.key_type_of(generated.key),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        der=certificates.certificate_der(cert),
        master_key=master_key_id,
        blob=blob,
    )


def reseal(
    tx: Transaction,
    directory: Directory,
    farm: Farm,
    rows: Sequence[CertificateRow],
    new: tuple[uuid.UUID, bytes],
    olds: Mapping[uuid.UUID, bytes],
) -> int:
    """Seal every row not yet under master key ``new`` again under it; how many were.
    ``olds``: the keys the rows are under, read before the transaction opened (a row sealed
    since costs one more, cached, directory read)."""
    key_id, key = new
    count = 0
    for row in rows:
        if row.master_key == key_id:
            continue
        old = olds.get(row.master_key)
        if old is None:
            old = directory.master_key(farm.dkm_group, row.master_key)
        blob = blob_format.reseal(
            row.blob,
            old_key=old,
            new_key=key,
            new_key_id=key_id,
            context=blob_context(farm.dkm_group, row.id, row.purpose),
        )
        tx.set_blob(row.id, master_key=key_id, blob=blob)
        count += 1
    return count


class NeedKey(Exception):
    """A fenced step found it must generate a certificate it has no key made for: the
    transaction is given up, the key made outside it, and the step tried again."""

    def __init__(self, purpose: str) -> None:
        super().__init__(purpose)
        self.purpose = purpose


class Spares:
    """Keys and certificates made before a fenced transaction opened, by purpose, with the
    database's clock when they were made."""

    def __init__(self, config: Config, db: ConfigDB) -> None:
        self._config = config
        self._db = db
        self._made: dict[str, tuple[certificates.Generated, datetime]] = {}

    def take(self, purpose: str, now: datetime) -> certificates.Generated:
        """The key made for ``purpose`` before this transaction; :class:`NeedKey` when
        none was (or it is stale), so the caller makes one outside and tries again."""
        spare = self._made.pop(purpose, None)
        if spare is None or not timedelta(0) <= now - spare[1] <= SPARE_FRESHNESS:
            raise NeedKey(purpose)
        return spare[0]

    def make(self, purpose: str) -> None:
        """Generate a key and certificate for ``purpose``, with no transaction open."""
        now = self._db.now()
        self._made[purpose] = (generate_certificate(self._config, purpose=purpose, now=now), now)

    def make_for(self, actions: Sequence[policy.Action]) -> None:
        """Make the keys ``actions`` will need, before the fenced transaction opens."""
        for action in actions:
            needs_key = action.kind in ("generate", "generate_and_promote")
            if needs_key and action.purpose not in self._made:
                self.make(action.purpose)

    def clear(self) -> None:
        self._made.clear()
