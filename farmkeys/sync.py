"""What a node does to install the farm's live certificates into its store.

`farmkeys sync` (the service's start-up hook) and `serve` (on every change)
both run :func:`sync`. Takes its collaborators and the time as arguments, so
tests run it against real servers without a clock.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime

from farmkeys.config import Config
from farmkeys.db import CertificateRow, Claim, ConfigDB, Farm, LiveSet, StoredState
from farmkeys.directory import MasterKeys
from farmkeys.errors import (
    CertificateError,
    DirectoryError,
    FarmConflictError,
    FarmStateError,
    InvalidBlobError,
    NotInitialisedError,
    StoreError,
)
from farmkeys.formats import farm_state
from farmkeys.pkcs12_password import Protection
from farmkeys.store import Carried, CertificateFiles, Installed, Manifest, Store

# bundle, certificates and blob (cryptography) are imported where a blob is opened: a sync
# that finds nothing changed opens none, and `farmkeys sync` at a service's start stays fast.

log = logging.getLogger(__name__)


# -- sync ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncReport:
    node: str
    dkm_group: uuid.UUID
    manifest: Manifest
    changed: bool
    master_keys: tuple[uuid.UUID, ...] = ()  # the keys this sync proved it can open with
    # What the operator should look into though the sync succeeded: a store this node had
    # installed into that turned up missing, empty or older (also logged at WARNING).
    warnings: tuple[str, ...] = ()


def sync(
    config: Config, db: ConfigDB, directory: MasterKeys, store: Store, *, now: datetime
) -> SyncReport:
    """Install the farm's live certificates into this node's store, then report them.

    The store is inspected first; then one statement reads the live set, with
    the blobs of only the certificates the store does not hold intact, and,
    when nothing changed, records the sync too: such a sync makes one round
    trip and no directory request. Otherwise only the certificates that changed
    are decrypted and written; the others are carried into the new generation by
    hard link, in their new roles. Each master key is read from the directory at
    most once per process (the directory caches it in memory). Every blob is
    opened and checked before the store is touched, and the store switches all
    at once, so a failure leaves the installed certificates as they were.

    The store's location is checked first (no folder above it that another account could
    change). A store this node installed into before that turns up missing, empty or
    older is a warning (:attr:`SyncReport.warnings`, and logged), not a silent fresh install.

    A master-key roll re-seals the blobs without changing any certificate:
    the store stays as it is (no new generation, no on_change hook), but the
    blobs that name a key this node has not yet proved it can read are
    opened once, and the node records the keys it opened with. So `status`
    shows which nodes can read the new key before the old one is deleted.

    With ``node.pkcs12_password_file`` the .p12 files are encrypted with its password
    (:mod:`farmkeys.pkcs12_password`). When the store's .p12 files have another
    protection than configured, every certificate is installed again (none is carried);
    a password file that only changed on disk costs one .p12 opened, never a sync that
    finds nothing changed.
    """
    store.check_location()
    protection = Protection.configured(config.node.pkcs12_password_file)
    installed = _protected_as_configured(store, store.inspect(), protection)
    live = _read_live(config, db, installed)
    farm, rows = live.farm, live.rows
    _check_pinned(config, farm, store, db.endpoint, installed)
    warnings = _vanished(store, installed, live)
    wanted = frozenset(r.identity for r in rows)
    in_sync = installed is not None and installed.matches(wanted)
    previous = None if installed is None else installed.manifest
    state = check_state(live, previous, directory, in_sync=in_sync)
    if in_sync:
        assert installed is not None
        done = _keep_installed(live, installed, directory, store, state)
    else:
        done = _install(
            live, installed, directory, store, state, protection, wanted=wanted, now=now
        )
    if not done.recorded:
        db.record_sync(
            config.node.id,
            generation=done.manifest.generation,
            installed=sorted(wanted),
            master_keys=done.keys,
            directory_server=directory.last_server,
            state_version=done.manifest.state_version,
            revoked=done.manifest.forgotten,
        )
    return SyncReport(
        node=config.node.id,
        dkm_group=farm.dkm_group,
        manifest=done.manifest,
        changed=done.changed,
        master_keys=tuple(done.keys),
        warnings=warnings,
    )


def _protected_as_configured(
    store: Store, installed: Installed | None, protection: Protection
) -> Installed | None:
    """``installed``, with nothing intact (so nothing is carried and every certificate is
    installed again) when its .p12 files are not protected as configured.

    Same marker: as configured, without reading the password file. Another marker of a
    store with a password: the file changed on disk; one installed .p12 is opened with
    the password it holds now, and if it opens, only the new marker is noted."""
    if installed is None or installed.manifest.pkcs12_password == protection.marker:
        return installed
    password = protection.password()
    if (
        password is not None
        and protection.marker is not None
        and installed.manifest.pkcs12_password is not None
        and _opens(store, password)
    ):
        manifest = store.note_pkcs12_password(protection.marker)
        return dataclasses.replace(installed, manifest=manifest)
    log.info(
        "the .p12 files of the store are not protected as node.pkcs12_password_file says"
        " (%s installed, %s configured): installing every certificate again",
        installed.manifest.pkcs12_protection,
        "none" if protection.path is None else "a password",
    )
    return dataclasses.replace(installed, intact=frozenset(), complete=False)


def _opens(store: Store, password: bytes) -> bool:
    """Whether the installed .p12 files open with ``password``: one is tried (they were all
    encrypted under one password); False when none can be read."""
    from farmkeys.formats import certificates

    try:
        found = store.pkcs12_files()
    except StoreError:
        return False
    files = [] if found is None else list(found[1].values())
    return bool(files) and certificates.pkcs12_opens(files[0], password)


def _vanished(store: Store, installed: Installed | None, live: LiveSet) -> tuple[str, ...]:
    """A store this node installed into before that is missing, empty or older than it
    installed: a warning (logged, and on the report), never a refusal, since the node's
    row that may say so is unauthenticated; the sync installs the farm's set as ever."""
    why = store.vanished(installed, live.node_generation, live.node_revoked)
    if why is None:
        return ()
    warning = (
        f"{why}; installing the farm's set afresh — find out who moved it, and check who"
        " can write the folders above it"
    )
    log.warning("%s", warning)
    return (warning,)


@dataclass(frozen=True)
class _Done:
    """What a sync did to the store: the manifest it leaves, whether it installed a new
    generation, the master keys proved, and whether the read recorded the sync already."""

    manifest: Manifest
    changed: bool
    keys: list[uuid.UUID]
    recorded: bool = False


def _read_live(config: Config, db: ConfigDB, installed: Installed | None) -> LiveSet:
    """The live set, in one statement: the blobs of only the certificates the store does not
    hold intact, and the sync recorded too when the store's claim still holds.
    :class:`NotInitialisedError` for a farm without primary certificates."""
    claim = None
    if installed is not None and installed.complete:
        manifest = installed.manifest
        claim = Claim(manifest.generation, manifest.identity(), manifest.state_version)
    have = sorted(t for _, t in installed.intact) if installed is not None else []
    live = db.live_set(config.node.id, claim=claim, have=have)
    if not any(r.role == "primary" for r in live.rows):
        raise NotInitialisedError(
            f"farm {live.farm.name!r} has no primary certificates in the config DB at"
            f" {db.endpoint}",
            "run `farmkeys init` to generate them",
        )
    return live


def _keep_installed(
    live: LiveSet,
    installed: Installed,
    directory: MasterKeys,
    store: Store,
    state: CheckedState | None,
) -> _Done:
    """The store already holds the live set: pin it, confirm the master keys not yet proved,
    and note a new farm state record; no new generation."""
    farm, rows = live.farm, live.rows
    manifest = installed.manifest
    if manifest.dkm_group is None:
        store.pin(farm.dkm_group)
    keys = _confirm_keys(farm, rows, directory, live.confirmed_keys)
    if state is not None and (
        manifest.state_version != state.version or manifest.state_digest != state.digest
    ):
        manifest = store.note_state(
            version=state.version, digest=state.digest, forget=state.revoked
        )
    elif live.recorded and set(keys) == live.confirmed_keys & {r.master_key for r in rows}:
        # Nothing changed, and the read recorded the sync already.
        return _Done(manifest, changed=False, keys=keys, recorded=True)
    return _Done(manifest, changed=False, keys=keys)


def _install(
    live: LiveSet,
    installed: Installed | None,
    directory: MasterKeys,
    store: Store,
    state: CheckedState | None,
    protection: Protection,
    *,
    wanted: frozenset[tuple[str, str, str]],
    now: datetime,
) -> _Done:
    """Install the live set as a new generation: open the blobs the read sent, carry the
    certificates the store holds intact, and switch the store all at once."""
    farm, rows = live.farm, live.rows
    intact = frozenset() if installed is None else installed.intact
    carried = [r for r in rows if (r.purpose, r.thumbprint) in intact]
    # The read sent the blobs of exactly these (the store did not hold them intact).
    fresh = [r for r in rows if (r.purpose, r.thumbprint) not in intact]
    password = protection.password() if fresh else None
    files: list[CertificateFiles | Carried] = [
        open_certificate(farm, row, directory, pkcs12_password=password) for row in fresh
    ]
    files += [Carried(r.purpose, r.role, r.thumbprint) for r in carried]
    manifest = store.install(
        files,
        now=now,
        dkm_group=farm.dkm_group,
        state_version=None if state is None else state.version,
        state_digest=None if state is None else state.digest,
        forget=() if state is None else state.revoked,
        pkcs12_password=protection.marker,
    )
    opened = frozenset(r.master_key for r in fresh)
    keys = _confirm_keys(farm, carried, directory, live.confirmed_keys | opened)
    keys = sorted(set(keys) | opened, key=str)
    log.info(
        "installed generation %d: %s (%d written, %d carried)",
        manifest.generation,
        ", ".join(f"{p} {r} {t}" for p, r, t in sorted(wanted)),
        len(fresh),
        len(carried),
    )
    return _Done(manifest, changed=True, keys=keys)


# -- the farm state record -------------------------------------------------------------


@dataclass(frozen=True)
class CheckedState:
    """The farm state a sync installs under: its version, the fingerprint of its stored
    bytes (so the next sync need not verify the same bytes again), and its revoked list."""

    version: int
    digest: str
    revoked: tuple[str, ...]


def check_state(
    live: LiveSet, manifest: Manifest | None, directory: MasterKeys, *, in_sync: bool
) -> CheckedState | None:
    """The farm state record that vouches for ``live``; :class:`FarmStateError` when none
    does. None for a farm from before farm state records, which this node has never seen
    one of (the leader writes the first at its next check).

    Refused: a record that is malformed, another farm's, or fails its MAC under the
    master key it names; a version below the highest this node installed (``manifest``);
    live rows that differ from the record; a live certificate that an urgent rollover
    replaced (the record's revoked list, and every one this node ever learned). Bytes
    this node already verified (same fingerprint) are not verified again. When the
    directory cannot be read to verify a new record and the store already holds the
    live set, nothing is installed either way: the sync goes on, the record unrecorded.
    """
    farm, stored = live.farm, live.state
    if manifest is not None and manifest.dkm_group != str(farm.dkm_group):
        manifest = None  # another farm's versions (a node moved on purpose: farm.dkm_group)
    installed = None if manifest is None else manifest.state_version
    installed_digest = None if manifest is None else manifest.state_digest
    if stored is None:
        _no_record(installed)
        return None
    digest = farm_state.digest(stored.body, stored.mac)
    state = _verified(stored, digest, installed_digest, farm, directory, in_sync=in_sync)
    if state is None:
        return None
    _check_version(state.version, digest, installed, installed_digest)
    forgotten = set(state.revoked) | (set() if manifest is None else set(manifest.forgotten))
    _check_rows(state, live.rows, forgotten)
    return CheckedState(version=state.version, digest=digest, revoked=state.revoked)


def _no_record(installed: int | None) -> None:
    """No farm state record in the config DB: refused if this node installed one, else (a
    farm from before them) a warning."""
    if installed is not None:
        raise FarmStateError(
            "the config DB has no farm state record, but this node installed version"
            f" {installed}; nothing was installed",
            farm_state.REPAIR,
        )
    log.warning(
        "the config DB has no farm state record yet (a farm from before them): the"
        " leader writes one at its next check"
    )


def _verified(
    stored: StoredState,
    digest: str,
    installed_digest: str | None,
    farm: Farm,
    directory: MasterKeys,
    *,
    in_sync: bool,
) -> farm_state.FarmState | None:
    """The stored record, verified under the master key it names unless this node verified
    these very bytes before; None when the directory cannot be read and ``in_sync``."""
    if installed_digest == digest:
        return _parsed_state(stored.body)  # these very bytes were verified before
    try:
        return farm_state.verify(
            stored.body,
            stored.mac,
            farm=farm.dkm_group,
            key_for=lambda key_id: directory.master_key(farm.dkm_group, key_id),
        )
    except DirectoryError as exc:
        if not in_sync:
            raise
        log.warning("cannot verify the new farm state yet (the store is in sync): %s", exc.what)
        return None


def _check_version(
    version: int, digest: str, installed: int | None, installed_digest: str | None
) -> None:
    """Refuse a record's version that is below the one this node installed, too far above
    it, or the same with other bytes."""
    if installed is not None and version < installed:
        raise FarmStateError(
            f"the config DB's farm state is version {version}, older than version"
            f" {installed} this node installed (a restored backup?); nothing was installed",
            farm_state.REPAIR,
        )
    if installed is not None and version > installed + farm_state.MAX_VERSION_STEP:
        raise FarmStateError(
            f"the config DB's farm state is version {version}, more than"
            f" {farm_state.MAX_VERSION_STEP} above version {installed} this node installed;"
            " no leader makes such a jump, so nothing was installed",
            farm_state.REPAIR,
        )
    if version == installed and installed_digest != digest:
        # The leader writes every record under a new version: the same version with other
        # bytes is a record made again from scratch (an adoption after the record was
        # deleted), which must not replace the one this node installed.
        raise FarmStateError(
            f"the config DB's farm state version {version} is not the version"
            f" {installed} this node installed, though it has the same number; nothing was"
            " installed",
            farm_state.REPAIR,
        )


def _check_rows(
    state: farm_state.FarmState, rows: list[CertificateRow], forgotten: set[str]
) -> None:
    """Refuse live rows that differ from the record, or a live certificate that an urgent
    rollover replaced (``forgotten``: the record's revoked list and the store's)."""
    error = farm_state.mismatch(state, rows, then="; nothing was installed")
    if error is not None:
        raise error
    for row in rows:
        if row.thumbprint in forgotten:
            raise FarmStateError(
                f"{row.purpose} certificate {row.thumbprint} was urgently replaced and must"
                " never be installed again, but the config DB has it live; nothing was"
                " installed",
                farm_state.REPAIR,
            )


@functools.lru_cache(maxsize=4)
def _parsed_state(body: bytes) -> farm_state.FarmState:
    """A record's bytes, parsed once per process: `serve` meets the same bytes on every
    sync until the leader writes the next version (a FarmState is immutable)."""
    return farm_state.parse(body)


def _check_pinned(
    config: Config, farm: Farm, store: Store, endpoint: str, installed: Installed | None
) -> None:
    """Refuse a config DB that names another farm than this node belongs to: the one
    ``farm.dkm_group`` names, else the one its store was first installed from (trust on
    first use). A store installed before pinning is pinned to the farm it holds.

    A manifest that cannot be read pins nothing: the install that follows repairs it,
    as it did before farms were pinned (whoever can corrupt it can also rewrite it).
    """
    if config.farm.dkm_group is not None:
        pinned, by = uuid.UUID(config.farm.dkm_group), "farm.dkm_group"
    else:
        manifest = None if installed is None else installed.manifest
        if manifest is None or manifest.dkm_group is None:
            return
        pinned, by = uuid.UUID(manifest.dkm_group), f"its store {store.path} (first installed)"
    if farm.dkm_group != pinned:
        raise FarmConflictError(
            f"the config DB at {endpoint} holds farm {farm.name!r} with DKM group"
            f" {farm.dkm_group}, but this node belongs to the farm with DKM group {pinned}"
            f" (pinned by {by}); nothing was installed",
            "point database.dsn at this farm's config DB; if the farm was re-created on"
            " purpose, set farm.dkm_group to the new DKM group",
        )


def _confirm_keys(
    farm: Farm,
    rows: list[CertificateRow],
    directory: MasterKeys,
    confirmed: frozenset[uuid.UUID],
) -> list[uuid.UUID]:
    """Open the blobs under keys this node has not yet proved it can read; the keys proved.

    The store already holds the live set, so a directory it cannot reach now
    does not fail the sync: the key stays unconfirmed (``status`` shows it)
    and the next sync tries again. A blob that does not open fails it.
    """
    proved = set(confirmed)
    unreadable: set[uuid.UUID] = set()  # asked once per sync: an outage costs one retry budget
    for row in rows:
        if row.master_key in proved or row.master_key in unreadable:
            continue
        try:
            open_blob(farm, row, directory)
        except DirectoryError as exc:
            log.warning(
                "cannot confirm master key %s yet (the store is in sync): %s",
                row.master_key,
                exc.what,
            )
            unreadable.add(row.master_key)
            continue
        proved.add(row.master_key)
    return sorted(proved & {r.master_key for r in rows}, key=str)


def open_blob(farm: Farm, row: CertificateRow, directory: MasterKeys) -> bytes:
    """The PKCS#12 sealed in one certificate row's blob, under the master key its row names."""
    from farmkeys.formats import blob

    context = blob.blob_context(farm.dkm_group, row.id, row.purpose)
    named = blob.master_key_id(row.blob, context=context)
    if named != row.master_key:
        raise InvalidBlobError(
            f"the blob of {row.purpose} certificate {row.id} names another master key than its row",
            "restore the row from a backup or replace the certificate",
        )
    key = directory.master_key(farm.dkm_group, named)
    return blob.open_blob(row.blob, master_key=key, context=context)


def open_certificate(
    farm: Farm,
    row: CertificateRow,
    directory: MasterKeys,
    *,
    pkcs12_password: bytes | None = None,
) -> CertificateFiles:
    """Decrypt and check one certificate row, ready for the store; with ``pkcs12_password``
    its .p12 is encrypted with it (:func:`farmkeys.formats.certificates.protect_pkcs12`), the
    .pem and .key are the bundle's bytes as ever.

    A blob that seals a bundle (:mod:`farmkeys.formats.bundle`) gives the very bytes the node
    writes; an older blob's bare PKCS#12 is parsed and its files built here (the slow
    path, until the certificate rolls over). Either is checked against the row the same
    cheap way (:func:`farmkeys.bundle.check`)."""
    from farmkeys.formats import bundle, certificates

    what = f"{row.purpose} certificate {row.id}"
    plaintext = open_blob(farm, row, directory)
    files = bundle.unpack(plaintext, what=what)
    if files is None:
        try:
            generated = certificates.from_pkcs12(plaintext)
        except CertificateError as exc:
            raise CertificateError(
                f"the blob of {what} opened but holds no usable PKCS#12: {exc.what}",
                "restore the row from a backup or replace the certificate",
            ) from None
        files = bundle.files(generated, friendly_name=row.subject)
    bundle.check(
        files,
        what=what,
        thumbprint=row.thumbprint,
        der=row.der,
        not_before=row.not_before,
        not_after=row.not_after,
    )
    pkcs12 = files.pkcs12
    if pkcs12_password is not None:
        try:
            pkcs12 = certificates.protect_pkcs12(pkcs12, pkcs12_password)
        except CertificateError as exc:
            raise CertificateError(
                f"the blob of {what} opened but its PKCS#12 cannot be re-encrypted: {exc.what}",
                "restore the row from a backup or replace the certificate",
            ) from None
    return CertificateFiles(
        purpose=row.purpose,
        role=row.role,
        thumbprint=row.thumbprint,
        not_after=row.not_after,
        certificate_pem=files.certificate_pem,
        private_key_pem=files.private_key_pem,
        pkcs12=pkcs12,
    )
