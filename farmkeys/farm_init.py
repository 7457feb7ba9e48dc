"""`farmkeys init`: create what a new farm needs, or check that an existing one is whole.

Run once per farm (idempotent). Takes its collaborators and the time as
arguments, so tests run it against real servers without a clock.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from farmkeys.config import Config
from farmkeys.db import ConfigDB, Farm, Transaction
from farmkeys.directory import Directory
from farmkeys.election import Election, read_lease
from farmkeys.errors import (
    DirectoryError,
    Error,
    FarmConflictError,
)
from farmkeys.formats.request import Requester
from farmkeys.leader import Leader, new_certificate, write_first_state
from farmkeys.vocab import PURPOSES

log = logging.getLogger(__name__)


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


def init_farm(
    config: Config,
    db: ConfigDB,
    directory: Directory,
    *,
    now: datetime,
    by: Requester | None = None,
) -> InitReport:
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
                    tx.record_master_key(key_id, stage="current", reason="farmkeys init")
                    tx.audit(
                        node=config.node.id,
                        term=None,
                        action="init",
                        detail=f"created farm {config.farm.name} with DKM group {group}",
                        by=by,
                    )
                    report.created_certificates = _add_primaries(
                        config, tx, group, key_id, key, now=now
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
            if {r.purpose for r in live if r.role == "primary"} != set(PURPOSES):
                _complete_as_leader(config, db, directory, report)
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


def _complete_as_leader(
    config: Config, db: ConfigDB, directory: Directory, report: InitReport
) -> None:
    """A farm that lacks a primary gets it through the leader's own fenced path: its
    rollover check (which promotes a usable secondary, or generates one) under the lease,
    checking and extending the farm state record like any leader write."""
    election = Election(db, node_id=config.node.id, lease=config.lease)
    if not election.try_acquire():
        lease = read_lease(db)
        report.warnings.append(
            f"the farm lacks a primary certificate; {lease.holder_node} leads and its next"
            " rollover check makes one (`farmkeys status` shows it)"
        )
        return
    try:
        done = Leader(config, db, directory, election).check()
    finally:
        election.release()
    report.created_certificates = [f"{a.purpose} {a.action} {a.thumbprint}" for a in done]


def _add_primaries(
    config: Config,
    tx: Transaction,
    group: uuid.UUID,
    key_id: uuid.UUID,
    key: bytes,
    *,
    now: datetime,
) -> list[str]:
    """A new farm's primaries and its first farm state record, in its creating transaction."""
    created = []
    rows = []
    for purpose in PURPOSES:
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
        rows.append(row)
        created.append(f"{purpose} primary {row.thumbprint}")
    write_first_state(tx, dkm_group=group, rows=rows, master_key_id=key_id, master_key=key)
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
            "restore it with `farmkeys escrow import` or from a directory backup; without its"
            " master keys no certificate "
            "can be decrypted, so farmkeys will not create new ones in its place",
        )


def _undo_container(directory: Directory, group: uuid.UUID) -> None:
    try:
        directory.delete_container(group)
    except Error as exc:
        log.warning(
            "could not remove DKM container of group %s after a failed init: %s", group, exc
        )
