"""What a node does, composed from the parts: init the farm, sync the store, report status.

Each operation takes its collaborators (config DB, directory, store) and the
current time as arguments, so tests run them against real servers without a
clock, and the CLI stays a thin shell around them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from farmkeys import certs, dkm
from farmkeys import policy as rollover_policy
from farmkeys.config import Config, PolicyConfig
from farmkeys.configdb import CertificateRow, ConfigDB, Farm, NewCertificate, Transaction
from farmkeys.directory import Directory, MasterKeyInfo
from farmkeys.errors import (
    CertificateError,
    DirectoryError,
    Error,
    FarmConflictError,
    InvalidBlobError,
    LeaderTimeoutError,
    NotInitialisedError,
)
from farmkeys.store import CertificateFiles, Manifest, Store

log = logging.getLogger(__name__)

LIVE_ROLES = ("primary", "secondary", "retired")


def blob_context(
    farm: Farm | uuid.UUID, certificate_id: uuid.UUID, purpose: str
) -> dkm.BlobContext:
    """What a certificate's blob is bound to: its farm's DKM group, its id and its purpose."""
    group = farm.dkm_group if isinstance(farm, Farm) else farm
    return dkm.BlobContext(farm=str(group), certificate_id=str(certificate_id), purpose=purpose)


# -- init ------------------------------------------------------------------------------


@dataclass
class InitReport:
    """What `farmkeys init` did; ``changed`` is False on a farm that was already complete."""

    farm_name: str
    dkm_group: uuid.UUID | None = None
    migrations: list[str] = field(default_factory=list)
    created_farm: bool = False
    created_certificates: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.migrations or self.created_farm or self.created_certificates)


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
    not_before = now.replace(microsecond=0)
    generated = certs.generate(
        farm_name=config.farm.name,
        purpose=purpose,
        key_type=config.policy.key,
        not_before=not_before,
        not_after=not_before + config.policy.units(config.policy.certificate_duration),
    )
    cert = generated.certificate
    cert_id = uuid.uuid4()
    thumb = certs.thumbprint(cert)
    pkcs12 = certs.to_pkcs12(
        cert, generated.key, friendly_name=f"{config.farm.name} token {purpose} {thumb}"
    )
    blob = dkm.seal(
        pkcs12,
        master_key=master_key,
        master_key_id=master_key_id,
        context=blob_context(dkm_group, cert_id, purpose),
    )
    return NewCertificate(
        id=cert_id,
        purpose=purpose,
        role=role,
        thumbprint=thumb,
        sha256=certs.sha256_fingerprint(cert),
        subject=cert.subject.rfc4514_string(),
        key_type=config.policy.key,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        der=certs.certificate_der(cert),
        master_key=master_key_id,
        blob=blob,
    )


def init_farm(config: Config, db: ConfigDB, directory: Directory, *, now: datetime) -> InitReport:
    """Create what a new farm needs; on a farm that has it all, change nothing.

    Order matters for "nothing lost": the directory is bound before anything is
    written; a new farm's DKM container is created before its rows, and removed
    again if the rows cannot be written.
    """
    report = InitReport(farm_name=config.farm.name)
    directory.bind()
    report.migrations = db.upgrade()
    with db.init_lock():
        farm = db.farm()
        if farm is None:
            group = uuid.uuid4()
            key_id = directory.create_container(group, farm_name=config.farm.name)
            try:
                key = directory.master_key(group, key_id)
                with db.transaction() as tx:
                    tx.create_farm(
                        name=config.farm.name,
                        dkm_group=group,
                        dkm_container=directory.container_dn(group),
                    )
                    tx.audit(
                        node=config.node.id,
                        term=None,
                        action="init",
                        detail=f"created farm {config.farm.name} with DKM group {group}",
                    )
                    report.created_certificates = _add_missing_primaries(
                        config, tx, group, key_id, key, existing=(), now=now
                    )
            except BaseException:
                _undo_container(directory, group)
                raise
            report.created_farm = True
            report.dkm_group = group
            log.info("created farm %s with DKM group %s", config.farm.name, group)
        else:
            report.dkm_group = farm.dkm_group
            _check_same_farm(config, farm, directory)
            live = db.certificates(include_archived=False)
            key_id = directory.current_key_id(farm.dkm_group)
            if {r.purpose for r in live if r.role == "primary"} != set(certs.PURPOSES):
                key = directory.master_key(farm.dkm_group, key_id)
                with db.transaction() as tx:
                    report.created_certificates = _add_missing_primaries(
                        config, tx, farm.dkm_group, key_id, key, existing=live, now=now
                    )
    if report.dkm_group is not None and _anonymous_can_read(directory, report):
        report.warnings.append(
            "an anonymous bind can read the DKM container"
            f" {directory.container_dn(report.dkm_group)}"
            " — restrict it to the service account as docs/directory-setup.md shows"
        )
    return report


def _anonymous_can_read(directory: Directory, report: InitReport) -> bool:
    assert report.dkm_group is not None
    try:
        return directory.anonymous_can_read(report.dkm_group)
    except Error as exc:
        report.warnings.append(f"could not check anonymous access to the DKM container: {exc}")
        return False


def _add_missing_primaries(
    config: Config,
    tx: Transaction,
    group: uuid.UUID,
    key_id: uuid.UUID,
    key: bytes,
    *,
    existing: Sequence[CertificateRow],
    now: datetime,
) -> list[str]:
    have = {r.purpose for r in existing if r.role == "primary"}
    created = []
    for purpose in certs.PURPOSES:
        if purpose in have:
            continue
        row = new_certificate(
            config,
            dkm_group=group,
            purpose=purpose,
            role="primary",
            master_key_id=key_id,
            master_key=key,
            now=now,
        )
        tx.insert_certificate(row)
        tx.audit(
            node=config.node.id,
            term=None,
            action="generate_and_promote",
            purpose=purpose,
            certificate=row.id,
            thumbprint=row.thumbprint,
            detail="farmkeys init: the farm had no primary",
        )
        created.append(f"{purpose} primary {row.thumbprint}")
    return created


def _check_same_farm(config: Config, farm: Farm, directory: Directory) -> None:
    if farm.name != config.farm.name:
        raise FarmConflictError(
            f"the config DB already holds farm {farm.name!r}, not {config.farm.name!r}",
            "set farm.name to the existing farm's name, or point database.dsn at another database",
        )
    expected = directory.container_dn(farm.dkm_group)
    if farm.dkm_container.lower() != expected.lower():
        raise FarmConflictError(
            f"the farm's DKM container is {farm.dkm_container}, but directory.container"
            f" puts it at {expected}",
            "set directory.container to the parent of the farm's DKM container",
        )
    if not directory.container_exists(farm.dkm_group):
        raise DirectoryError(
            f"the farm's DKM container {farm.dkm_container} is missing from the directory"
            f" at {directory.endpoint}, or {config.directory.bind_dn} cannot read it",
            "restore it from a directory backup; without its master keys no certificate "
            "can be decrypted, so farmkeys will not create new ones in its place",
        )


def _undo_container(directory: Directory, group: uuid.UUID) -> None:
    try:
        directory.delete_container(group)
    except Error as exc:
        log.warning(
            "could not remove DKM container of group %s after a failed init: %s", group, exc
        )


# -- sync ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncReport:
    node: str
    dkm_group: uuid.UUID
    manifest: Manifest
    changed: bool


def sync(
    config: Config, db: ConfigDB, directory: Directory, store: Store, *, now: datetime
) -> SyncReport:
    """Install the farm's live certificates into this node's store, then report them.

    One query reads the live set; each master key is read from the directory
    at most once per process (the directory caches it in memory); archived
    certificates are never read. When the store already holds the live set,
    nothing is decrypted or written. Every blob is opened and checked before
    the store is touched, and the store switches all at once, so a failure
    leaves the installed certificates as they were.
    """
    farm, rows = db.live_set()
    if not any(r.role == "primary" for r in rows):
        raise NotInitialisedError(
            f"farm {farm.name!r} has no primary certificates in the config DB at {db.endpoint}",
            "run `farmkeys init` to generate them",
        )
    wanted = frozenset(r.identity for r in rows)
    if store.matches(wanted):
        manifest = store.manifest()
        assert manifest is not None
        changed = False
    else:
        files = [open_certificate(farm, row, directory) for row in rows]
        manifest = store.install(files, now=now)
        changed = True
        log.info(
            "installed generation %d: %s",
            manifest.generation,
            ", ".join(f"{p} {r} {t}" for p, r, t in sorted(wanted)),
        )
    db.record_sync(config.node.id, generation=manifest.generation, installed=sorted(wanted))
    return SyncReport(
        node=config.node.id, dkm_group=farm.dkm_group, manifest=manifest, changed=changed
    )


def open_certificate(farm: Farm, row: CertificateRow, directory: Directory) -> CertificateFiles:
    """Decrypt and verify one certificate row, ready for the store."""
    context = blob_context(farm, row.id, row.purpose)
    named = dkm.master_key_id(row.blob, context=context)
    if named != row.master_key:
        raise InvalidBlobError(
            f"the blob of {row.purpose} certificate {row.id} names another master key than its row",
            "restore the row from a backup or replace the certificate",
        )
    key = directory.master_key(farm.dkm_group, named)
    pkcs12 = dkm.open_blob(row.blob, master_key=key, context=context)
    try:
        generated = certs.from_pkcs12(pkcs12)
    except CertificateError as exc:
        raise CertificateError(
            f"the blob of {row.purpose} certificate {row.id} opened but holds no usable"
            f" PKCS#12: {exc.what}",
            "restore the row from a backup or replace the certificate",
        ) from None
    cert = generated.certificate
    if (
        certs.thumbprint(cert) != row.thumbprint
        or certs.certificate_der(cert) != row.der
        or cert.not_valid_before_utc != row.not_before
        or cert.not_valid_after_utc != row.not_after
    ):
        raise CertificateError(
            f"the blob of {row.purpose} certificate {row.id} holds a certificate other than"
            f" its row describes ({row.thumbprint})",
            "restore the row from a backup or replace the certificate",
        )
    if not certs.key_matches(cert, generated.key):
        raise CertificateError(
            f"the private key in the blob of {row.purpose} certificate {row.thumbprint} does"
            " not match the certificate",
            "restore the row from a backup or replace the certificate",
        )
    return CertificateFiles(
        purpose=row.purpose,
        role=row.role,
        thumbprint=row.thumbprint,
        not_after=cert.not_valid_after_utc,
        certificate_pem=certs.certificate_pem(cert),
        private_key_pem=certs.private_key_pem(generated.key),
        pkcs12=certs.to_pkcs12(cert, generated.key, friendly_name=row.subject),
    )


# -- status ----------------------------------------------------------------------------

HEALTH_ORDER = ("ok", "warning", "critical")


@dataclass
class _Problems:
    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, level: str, text: str) -> None:
        self.items.append((level, text))

    @property
    def health(self) -> str:
        return max((lvl for lvl, _ in self.items), key=HEALTH_ORDER.index, default="ok")


def farm_status(
    config: Config, db: ConfigDB, directory: Directory | None, *, now: datetime
) -> dict[str, Any]:
    """The farm at a glance, as the JSON document `farmkeys status --json` prints.

    Reads the config DB (raising if it cannot) and the directory's key list
    (never key material; a directory failure becomes a problem, not an error).
    """
    farm = db.require_farm()
    rows = db.certificates()
    nodes = db.nodes()
    problems = _Problems()
    policy = config.policy
    live = [r for r in rows if r.role in LIVE_ROLES]
    live_set = frozenset(r.identity for r in live)

    for purpose in certs.PURPOSES:
        primary = next((r for r in live if r.purpose == purpose and r.role == "primary"), None)
        secondary = next((r for r in live if r.purpose == purpose and r.role == "secondary"), None)
        if primary is None:
            problems.add("critical", f"there is no primary {purpose} certificate")
            continue
        left = primary.not_after - now
        if left <= timedelta(0):
            problems.add(
                "critical", f"the primary {purpose} certificate {primary.thumbprint} has expired"
            )
        elif left <= policy.units(policy.critical_threshold):
            problems.add(
                "critical",
                f"the primary {purpose} certificate {primary.thumbprint} expires in"
                f" {_human(left)}, inside the critical threshold",
            )
        elif left <= policy.units(policy.generation_threshold) and secondary is None:
            problems.add(
                "warning",
                f"the primary {purpose} certificate {primary.thumbprint} expires in"
                f" {_human(left)} and has no secondary yet",
            )

    master_keys: list[dict[str, Any]]
    if directory is None:
        master_keys = _keys_named_by(live)
    else:
        try:
            infos = directory.list_keys(farm.dkm_group)
        except DirectoryError as exc:
            problems.add("warning", f"cannot list master keys: {exc.what}")
            master_keys = _keys_named_by(live)
        else:
            master_keys = [_key_json(k) for k in infos]
            present = {k.id for k in infos}
            for key_id in sorted({r.master_key for r in live} - present, key=str):
                problems.add(
                    "critical",
                    f"master key {key_id}, which live certificates need, is missing from"
                    " the directory",
                )

    lease = _lease(db)
    if lease is None or not lease["valid"]:
        problems.add("warning", "no node holds the leader lease; is `farmkeys serve` running?")

    if not nodes:
        problems.add("warning", "no node has synced yet; run `farmkeys sync` on each node")
    silent_after = timedelta(seconds=3 * config.lease.ttl_seconds)
    node_docs = []
    for n in nodes:
        in_sync = frozenset(n.installed) == live_set
        if not in_sync:
            problems.add("warning", f"node {n.id} has not installed the live certificate set")
        if n.last_error:
            problems.add("warning", f"node {n.id}'s last sync failed: {n.last_error}")
        db_now = lease["now"] if lease is not None else now
        if n.heartbeat_at is not None and db_now - n.heartbeat_at > silent_after:
            problems.add(
                "warning",
                f"node {n.id} has not been heard from since {n.heartbeat_at.isoformat()}",
            )
        if n.directory_error and n.heartbeat_at is not None:
            problems.add("warning", f"node {n.id} cannot reach the directory: {n.directory_error}")
        if n.hook_error:
            problems.add("warning", f"node {n.id}'s on_change hook failed: {n.hook_error}")
        node_docs.append(
            {
                "id": n.id,
                "last_sync": _iso(n.last_sync),
                "last_seen": _iso(n.last_seen),
                "generation": n.generation,
                "installed": [t for _, _, t in sorted(n.installed)],
                "in_sync": in_sync,
                "last_error": n.last_error,
                "heartbeat_at": _iso(n.heartbeat_at),
                "directory_error": n.directory_error,
                "hook_error": n.hook_error,
            }
        )

    return {
        "farm": {
            "name": farm.name,
            "dkm_group": str(farm.dkm_group),
            "dkm_container": farm.dkm_container,
            "schema_version": farm.schema_version,
        },
        "health": problems.health,
        "problems": [text for _, text in problems.items],
        "leader": _leader_json(lease),
        "certificates": [_certificate_json(r, _next(policy, now, live, r)) for r in rows],
        "master_keys": master_keys,
        "nodes": node_docs,
        "checked_at": _iso(now),
    }


def _lease(db: ConfigDB) -> dict[str, Any] | None:
    rows = db.fetch(
        "SELECT holder_node, term, expires_at, now() AS now,"
        " holder IS NOT NULL AND expires_at > now() AS valid FROM leader_lease"
    )
    return rows[0] if rows else None


def _leader_json(lease: dict[str, Any] | None) -> dict[str, Any] | None:
    if lease is None or not lease["valid"]:
        return None
    return {
        "node": lease["holder_node"],
        "term": lease["term"],
        "expires_at": _iso(lease["expires_at"]),
    }


def _next(
    policy: PolicyConfig, now: datetime, live: Sequence[CertificateRow], row: CertificateRow
) -> dict[str, Any] | None:
    if row.role not in LIVE_ROLES:
        return None
    scheduled = rollover_policy.next_action(policy, now, live, row.id)
    return None if scheduled is None else {"action": scheduled.action, "at": _iso(scheduled.at)}


def _certificate_json(row: CertificateRow, next_action: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "purpose": row.purpose,
        "role": row.role,
        "thumbprint": row.thumbprint,
        "sha256": row.sha256,
        "subject": row.subject,
        "key_type": row.key_type,
        "not_before": _iso(row.not_before),
        "not_after": _iso(row.not_after),
        "master_key": str(row.master_key),
        "created_at": _iso(row.created_at),
        "next_action": next_action,
    }


def _key_json(info: MasterKeyInfo) -> dict[str, Any]:
    return {"id": str(info.id), "created_at": _iso(info.created_at), "current": info.current}


def _keys_named_by(rows: Sequence[CertificateRow]) -> list[dict[str, Any]]:
    ids = sorted({r.master_key for r in rows}, key=str)
    return [{"id": str(k), "created_at": None, "current": None} for k in ids]


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 2 * 86400:
        return f"{seconds // 86400} days"
    if seconds >= 2 * 3600:
        return f"{seconds // 3600} hours"
    if seconds >= 120:
        return f"{seconds // 60} minutes"
    return f"{seconds} seconds"


# -- rollover on request -----------------------------------------------------------------


@dataclass(frozen=True)
class RolloverOutcome:
    request: int
    ok: bool
    done_by: str | None
    term: int | None
    result: str


def request_rollover(
    config: Config,
    db: ConfigDB,
    directory: Directory,
    *,
    purpose: str,
    urgent: bool,
    timeout_seconds: float,
) -> RolloverOutcome:
    """Ask the leader for a rollover and wait for its answer.

    When no process holds the lease, take it for the operation, answer the
    request under the fence, and give the lease back. Either way exactly one
    writer acts. A request nobody answered in time is withdrawn, so it cannot
    surprise anyone later.
    """
    # Imported here: rollover builds on this module.
    from farmkeys.election import Election, read_lease
    from farmkeys.rollover import Leader

    db.require_farm()
    request = db.request_rollover(node_id=config.node.id, purpose=purpose, urgent=urgent)
    deadline = time.monotonic() + timeout_seconds
    while True:
        row = db.rollover_request(request)
        if row["done_at"] is not None:
            return RolloverOutcome(
                request, bool(row["ok"]), row["done_by"], row["term"], row["result"] or ""
            )
        if not read_lease(db).valid:
            election = Election(db, node_id=config.node.id, lease=config.lease)
            if election.try_acquire():
                log.info("no node leads; %s took the lease for this rollover", config.node.id)
                try:
                    Leader(config, db, directory, election).answer_requests()
                except Error as exc:
                    _withdraw(db, request, f"withdrawn: {exc.what}")
                    raise
                finally:
                    election.release()
                continue
        if time.monotonic() >= deadline:
            if _withdraw(db, request, "withdrawn: no leader answered in time"):
                lease = read_lease(db)
                raise LeaderTimeoutError(
                    f"the leader ({lease.holder_node or 'none'}) did not answer rollover"
                    f" request {request} within {timeout_seconds:.0f} s; it was withdrawn",
                    "check `farmkeys serve` on the leader (`farmkeys status`), then try again",
                )
            continue  # answered as we withdrew it: report the answer
        time.sleep(0.2)


def _withdraw(db: ConfigDB, request: int, why: str) -> bool:
    """Mark a request that nobody carried out as done and failed; False if it was answered."""
    rows = db.fetch(
        "UPDATE rollover_request SET done_at = now(), ok = false, result = %s"
        " WHERE id = %s AND done_at IS NULL RETURNING id",
        (why, request),
    )
    return bool(rows)
