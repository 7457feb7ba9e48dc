"""The farm at a glance: the document `farmkeys status` prints and monitoring reads.

Reads the config DB and the directory's key list; key material only to check the
farm state record's MAC, never to print.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from farmkeys import policy as rollover_policy
from farmkeys.config import Config, PolicyConfig
from farmkeys.db import CertificateRow, ConfigDB, Farm, Lease, MasterKeyRow
from farmkeys.directory import Directory, MasterKeyInfo
from farmkeys.errors import DirectoryError, FarmStateError, MasterKeyMissingError
from farmkeys.formats import farm_state
from farmkeys.vocab import LIVE_ROLES, PURPOSES

log = logging.getLogger(__name__)


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

    Reads the config DB (raising if it cannot) and the directory's key list (a
    directory failure becomes a problem, not an error). Key material only to check
    the farm state record's MAC, in memory; nothing of it is printed.
    """
    farm = db.require_farm()
    rows = db.certificates()
    problems = _Problems()
    policy = config.policy
    live = [r for r in rows if r.role in LIVE_ROLES]
    live_set = frozenset(r.identity for r in live)
    silent_after = timedelta(seconds=3 * config.lease.ttl_seconds)
    nodes = db.node_documents(live_set, silent_after_seconds=silent_after.total_seconds())

    for purpose in PURPOSES:
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

    recorded = db.master_keys()
    in_directory: list[MasterKeyInfo] | None = None
    if directory is not None:
        try:
            in_directory = directory.list_keys(farm.dkm_group)
        except MasterKeyMissingError as exc:  # the whole DKM container is gone
            problems.add("critical", f"no live certificate can be opened: {exc.what}")
        except DirectoryError as exc:
            problems.add("warning", f"cannot list master keys: {exc.what}")
        else:
            _check_protection(directory, farm.dkm_group, problems)
    master_keys, schedule = _master_keys(config, now, recorded, in_directory, rows, problems)
    current = rollover_policy.current_key(recorded)
    current_key = None if current is None else current.id

    state_doc = _farm_state(db, farm, live, nodes, current, directory, problems)
    parties_doc, unfetched = _relying_parties(config, db, live, now, problems)

    lease = db.lease()
    if lease is None or not lease.valid:
        problems.add("warning", "no node holds the leader lease; is `farmkeys serve` running?")

    if not nodes:
        problems.add("warning", "no node has synced yet; run `farmkeys sync` on each node")
    live_keys = {str(r.master_key) for r in live}
    node_docs = []
    for doc in nodes:
        node, silent = doc["id"], doc.pop("silent")
        if not doc["in_sync"]:
            problems.add("warning", f"node {node} has not installed the live certificate set")
        if doc["last_error"]:
            problems.add("warning", f"node {node}'s last sync failed: {doc['last_error']}")
        if silent:
            problems.add(
                "warning", f"node {node} has not been heard from since {doc['heartbeat_at']}"
            )
        if doc["directory_error"] and doc["heartbeat_at"] is not None:
            problems.add(
                "warning", f"node {node} cannot reach the directory: {doc['directory_error']}"
            )
        if doc["hook_error"]:
            problems.add("warning", f"node {node}'s on_change hook failed: {doc['hook_error']}")
        unconfirmed = sorted(live_keys - set(doc["master_keys"]))
        if (
            doc["in_sync"]
            and unconfirmed
            and doc["heartbeat_at"] is not None
            and not doc["last_error"]
        ):
            problems.add(
                "warning",
                f"node {node} has not yet opened the live blobs under master key"
                f" {', '.join(unconfirmed)}",
            )
        node_docs.append(doc)

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
        "certificates": [
            _certificate_json(r, _next(policy, now, live, r, current_key, schedule, unfetched))
            for r in rows
        ],
        "master_keys": master_keys,
        "farm_state": state_doc,
        "nodes": node_docs,
        "relying_parties": parties_doc,
        "checked_at": _iso(now),
    }


def _farm_state(
    db: ConfigDB,
    farm: Farm,
    live: Sequence[CertificateRow],
    nodes: Sequence[dict[str, Any]],
    table_current: MasterKeyRow | None,
    directory: Directory | None,
    problems: _Problems,
) -> dict[str, Any]:
    """The farm state record: its version, the key its MAC is under, and whether it is
    authentic (None: it could not be checked) and matches the live rows; ``table_current``
    is the key the ``master_key`` table calls current, which must be the record's."""
    stored = db.stored_state()
    doc: dict[str, Any] = {"version": None, "master_key": None, "authentic": None}
    newest = max(
        (n["state_version"] for n in nodes if n["state_version"] is not None), default=None
    )
    if stored is None:
        if newest is not None:
            problems.add(
                "critical",
                f"the config DB has no farm state record, but nodes installed version {newest}"
                f" — {farm_state.REPAIR}",
            )
            doc["authentic"] = False
        else:
            problems.add(
                "warning",
                "the config DB has no farm state record yet (a farm from before them); the"
                " leader writes it at its next check, or run `farmkeys repair-state`",
            )
        return doc
    doc["version"] = stored.version
    try:
        state = farm_state.parse(stored.body)
        doc["version"], doc["master_key"] = state.version, str(state.master_key)
        if directory is not None:
            farm_state.verify(
                stored.body,
                stored.mac,
                farm=farm.dkm_group,
                key_for=lambda key_id: directory.master_key(farm.dkm_group, key_id),
            )
            doc["authentic"] = True
    except FarmStateError as exc:
        problems.add("critical", exc.diagnostics())
        doc["authentic"] = False
        return doc
    except DirectoryError as exc:
        problems.add("warning", f"cannot verify the farm state record: {exc.what}")
    if stored.version != state.version:
        problems.add(
            "critical",
            f"the farm_state row's version column says {stored.version}, but its record is"
            f" version {state.version}: someone wrote the config DB by hand (the leader"
            " ignores the column and rewrites it with its next record)",
        )
    if table_current is not None and table_current.id != state.master_key:
        problems.add(
            "critical",
            f"the master_key table names {table_current.id} current, but the farm state record"
            f" is under {state.master_key}: someone wrote the config DB by hand (the leader"
            " follows the record and seals under its key)",
        )
    error = farm_state.mismatch(state, live)
    if error is not None:
        doc["authentic"] = False
        problems.add("critical", error.diagnostics())
    for n in nodes:
        if n["state_version"] is not None and n["state_version"] > state.version:
            problems.add(
                "critical",
                f"node {n['id']} installed farm state version {n['state_version']}, newer than the"
                f" config DB's {state.version} (a restored backup?) — {farm_state.REPAIR}",
            )
    return doc


def _relying_parties(
    config: Config,
    db: ConfigDB,
    live: Sequence[CertificateRow],
    now: datetime,
    problems: _Problems,
) -> tuple[list[dict[str, Any]], dict[uuid.UUID, tuple[str, ...]]]:
    """Each relying party of ``[publish]``: its last fetch, and whether it has fetched the
    signing secondary; and which secondaries' promotions wait for whom."""
    parties = config.publish.parties
    if not parties:
        return [], {}
    fetches = db.fetches()
    fetched = {(f.relying_party, f.thumbprint) for f in fetches}
    secondary = next((r for r in live if r.purpose == "signing" and r.role == "secondary"), None)
    live_signing = {r.thumbprint for r in live if r.purpose == "signing"}
    docs = []
    for party in parties:
        own = [f for f in fetches if f.relying_party == party.name]
        last = max(own, key=lambda f: f.last_fetched_at, default=None)
        docs.append(
            {
                "name": party.name,
                "url": party.url,
                "last_fetch_at": _iso(last.last_fetched_at) if last else None,
                "last_node": last.node if last else None,
                "fetched": sorted(f.thumbprint for f in own if f.thumbprint in live_signing),
                "has_secondary": None
                if secondary is None
                else (party.name, secondary.thumbprint) in fetched,
            }
        )
    names = [p.name for p in parties]
    waiting = rollover_policy.unfetched_by(names, fetched, live)
    policy = config.policy
    if secondary is not None and secondary.id in waiting and policy.require_fetch:
        due = secondary.created_at + policy.units(policy.promotion_threshold)
        if now >= due:
            primary = next(
                (r for r in live if r.purpose == "signing" and r.role == "primary"), None
            )
            regardless = (
                ""
                if primary is None
                else f"; it is promoted regardless at"
                f" {_iso(primary.not_after - policy.units(policy.critical_threshold))}"
            )
            problems.add(
                "warning",
                f"the promotion of signing secondary {secondary.thumbprint}, due since"
                f" {_iso(due)}, waits for relying parties that have not fetched it:"
                f" {', '.join(waiting[secondary.id])}{regardless}",
            )
    return docs, (waiting if policy.require_fetch else {})


def _leader_json(lease: Lease | None) -> dict[str, Any] | None:
    if lease is None or not lease.valid:
        return None
    return {
        "node": lease.holder_node,
        "term": lease.term,
        "expires_at": _iso(lease.expires_at),
    }


def _next(
    policy: PolicyConfig,
    now: datetime,
    live: Sequence[CertificateRow],
    row: CertificateRow,
    current_key: uuid.UUID | None,
    schedule: dict[uuid.UUID, rollover_policy.KeySchedule],
    unfetched: dict[uuid.UUID, tuple[str, ...]],
) -> dict[str, Any] | None:
    """The next thing that happens to a certificate: a rollover step, a re-seal of its blob
    when the master key rolls, or, for an archived one, its shredding."""
    keys = schedule.get(row.master_key)
    if row.role not in LIVE_ROLES:
        if keys is None or keys.delete_at is None:
            return None
        return {"action": "shred", "at": _iso(keys.delete_at)}
    scheduled = rollover_policy.next_action(policy, now, live, row.id, unfetched=unfetched)
    found = None if scheduled is None else (scheduled.action, scheduled.at)
    if current_key is not None and row.master_key != current_key:
        found = ("reseal", now)  # a roll in progress or cut short: the next check re-seals it
    elif (
        keys is not None and keys.roll_at is not None and (found is None or keys.roll_at < found[1])
    ):
        found = ("reseal", keys.roll_at)
    return None if found is None else {"action": found[0], "at": _iso(found[1])}


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


def _check_protection(directory: Directory, group: uuid.UUID, problems: _Problems) -> None:
    """On Active Directory: critical when the farm container's descriptor lets others read."""
    try:
        problem = directory.container_protection_problem(group)
    except DirectoryError as exc:
        problems.add("warning", f"cannot read the DKM container's security descriptor: {exc.what}")
        return
    if problem is not None:
        problems.add(
            "critical",
            f"the DKM container {directory.container_dn(group)} is not protected: {problem};"
            " anyone it lets read can take the master keys (docs/directory-setup.md)",
        )


def _master_keys(
    config: Config,
    now: datetime,
    recorded: Sequence[MasterKeyRow],
    in_directory: Sequence[MasterKeyInfo] | None,
    rows: Sequence[CertificateRow],
    problems: _Problems,
) -> tuple[list[dict[str, Any]], dict[uuid.UUID, rollover_policy.KeySchedule]]:
    """Every master key the farm recorded or the directory holds, and the problems they show.

    ``in_directory`` is None when the directory could not be listed."""
    live = [r for r in rows if r.role in LIVE_ROLES]
    named = {r.master_key for r in live}
    schedule = rollover_policy.master_key_schedule(
        config.master_key, config.policy, now, recorded, named
    )
    present = None if in_directory is None else {k.id: k for k in in_directory}
    by_id = {k.id: k for k in recorded}
    docs = []
    for key_id in [*by_id, *(k for k in present or {} if k not in by_id)]:
        record = by_id.get(key_id)
        info = None if present is None else present.get(key_id)
        sealed_live = sum(1 for r in live if r.master_key == key_id)
        sealed_archived = sum(1 for r in rows if r.role == "archived" and r.master_key == key_id)
        times = schedule.get(key_id)
        created = record.created_at if record else (info.created_at if info else None)
        docs.append(
            {
                "id": str(key_id),
                "created_at": _iso(created),
                "current": record.state == "current" if record else False,
                "state": record.state if record else "unrecorded",
                "in_directory": None if present is None else info is not None,
                "sealed_live": sealed_live,
                "sealed_archived": sealed_archived,
                "roll_at": _iso(times.roll_at) if times else None,
                "delete_at": _iso(times.delete_at) if times else None,
            }
        )
        if record is None and recorded:
            problems.add(
                "warning",
                f"master key {key_id} is in the directory but the farm has no record of it;"
                " it was not made by this farm's leader",
            )
        if sealed_live and present is not None and info is None:
            problems.add(
                "critical",
                f"master key {key_id}, which {sealed_live} live certificates need, is missing"
                " from the directory",
            )
        if times is not None and times.roll_at is not None and now >= times.roll_at:
            problems.add(
                "warning",
                f"the current master key {key_id} is past its lifetime (due {_iso(times.roll_at)});"
                " is the leader running and the directory reachable?",
            )
        if record is not None and record.state != "current" and sealed_live:
            since = record.replaced_at or record.created_at
            late = timedelta(seconds=config.policy.rollover_interval_seconds)
            if now - since > late:
                problems.add(
                    "warning",
                    f"{sealed_live} live blobs are still sealed under master key {key_id},"
                    f" which is {record.state}, since {_iso(since)}",
                )
    if not recorded:
        problems.add(
            "warning",
            "the farm's master keys are not recorded in the config DB yet; the leader"
            " records them at its next check (is `farmkeys serve` running?)",
        )
    if not recorded and present is not None:
        for key_id in sorted(named - set(present), key=str):
            problems.add(
                "critical",
                f"master key {key_id}, which live certificates need, is missing from the directory",
            )
    return docs, schedule


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
