"""The farm at a glance: the document `farmkeys status` prints and monitoring reads.

Reads the config DB and the directory's key list; key material only to check the
farm state record's MAC, never to print. :func:`read_farm_status` composes the parts,
each in its own module: the certificates, the master keys, the farm state record, the
relying parties, the nodes and this node's own store, every one adding the problems it
finds; the typed document is in :mod:`farmkeys.status.document`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from farmkeys import policy as rollover_policy
from farmkeys.config import Config
from farmkeys.db import ConfigDB, Lease
from farmkeys.directory import Directory
from farmkeys.status.certificates import certificate_statuses, check_expiry
from farmkeys.status.document import (
    HEALTH_ORDER,
    CertificateStatus,
    FarmInfo,
    FarmStateStatus,
    FarmStatus,
    Health,
    LeaderInfo,
    MasterKeyStatus,
    NextAction,
    NodeStatus,
    PromotionHold,
    RelyingPartyStatus,
)
from farmkeys.status.local_store import check_local_store
from farmkeys.status.master_keys import keys_in_directory, master_keys
from farmkeys.status.nodes import check_nodes, node_statuses
from farmkeys.status.problems import Problems
from farmkeys.status.relying_parties import fetch_authenticator, relying_parties
from farmkeys.status.state_record import farm_state_status
from farmkeys.vocab import LIVE_ROLES

__all__ = [
    "HEALTH_ORDER",
    "CertificateStatus",
    "FarmInfo",
    "FarmStateStatus",
    "FarmStatus",
    "Health",
    "LeaderInfo",
    "MasterKeyStatus",
    "NextAction",
    "NodeStatus",
    "PromotionHold",
    "RelyingPartyStatus",
    "read_farm_status",
]

log = logging.getLogger(__name__)


def read_farm_status(
    config: Config, db: ConfigDB, directory: Directory | None, *, now: datetime
) -> FarmStatus:
    """The farm at a glance, the document `farmkeys status` prints.

    Reads the config DB (raising if it cannot) and the directory's key list (a
    directory failure becomes a problem, not an error). Key material only to check
    the farm state record's MAC, in memory; nothing of it is printed.
    """
    farm = db.require_farm()
    rows = db.certificates()
    problems = Problems()
    live = [r for r in rows if r.role in LIVE_ROLES]
    silent_after = timedelta(seconds=3 * config.lease.ttl_seconds)
    nodes, silent = node_statuses(
        db.node_documents(
            frozenset(r.identity for r in live),
            silent_after_seconds=silent_after.total_seconds(),
            stopped_after_seconds=config.status.stopped_warning_seconds,
        )
    )
    check_expiry(config.policy, now, live, problems)

    recorded = db.master_keys()
    in_directory = keys_in_directory(directory, farm.dkm_group, problems)
    keys, schedule = master_keys(config, now, recorded, in_directory, rows, problems)
    current = rollover_policy.current_key(recorded)
    state = farm_state_status(db, farm, live, nodes, current, directory, problems, config.policy)
    parties, unfetched = relying_parties(
        config, db, live, now, problems, authentic=fetch_authenticator(directory, farm)
    )

    lease = db.lease()
    if lease is None or not lease.valid:
        problems.add("warning", "no node holds the leader lease; is `farmkeys serve` running?")
    check_nodes(nodes, silent, {str(r.master_key) for r in live}, problems)
    check_local_store(config, nodes, db.revoked_by_node(), problems)

    current_key = None if current is None else current.id
    return FarmStatus(
        farm=FarmInfo(farm.name, farm.dkm_group, farm.dkm_container, farm.schema_version),
        health=problems.health,
        problems=problems.texts,
        leader=_leader(lease),
        certificates=certificate_statuses(
            config.policy,
            now,
            rows,
            current_key,
            schedule,
            unfetched,
            held=frozenset(h.secondary for h in state.holds),
        ),
        master_keys=keys,
        farm_state=state,
        nodes=tuple(nodes),
        relying_parties=parties,
        checked_at=now,
    )


def _leader(lease: Lease | None) -> LeaderInfo | None:
    if lease is None or not lease.valid:
        return None
    return LeaderInfo(node=lease.holder_node, term=lease.term, expires_at=lease.expires_at)
