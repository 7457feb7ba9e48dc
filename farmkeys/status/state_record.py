"""The farm state record as status checks it: present, authentic under its master key,
and agreeing with the master key table, the live rows and what the nodes installed."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from farmkeys.config import PolicyConfig
from farmkeys.db import CertificateRow, ConfigDB, Farm, MasterKeyRow, StoredState
from farmkeys.directory import Directory
from farmkeys.errors import DirectoryError, FarmStateError
from farmkeys.formats import farm_state
from farmkeys.status.document import FarmStateStatus, NodeStatus, PromotionHold
from farmkeys.status.problems import Problems


def farm_state_status(
    db: ConfigDB,
    farm: Farm,
    live: Sequence[CertificateRow],
    nodes: Sequence[NodeStatus],
    table_current: MasterKeyRow | None,
    directory: Directory | None,
    problems: Problems,
    policy: PolicyConfig,
) -> FarmStateStatus:
    """The farm state record: its version, the key its MAC is under, and whether it is
    authentic (None: it could not be checked) and matches the live rows; ``table_current``
    is the key the ``master_key`` table calls current, which must be the record's. The
    promotions a revert holds (a warning each: the operator is to release them), as a
    record that is not refuted says."""
    stored = db.stored_state()
    if stored is None:
        return _missing(_newest(nodes), problems)
    try:
        state = farm_state.parse(stored.body)
    except FarmStateError as exc:
        problems.add("critical", exc.diagnostics())
        return FarmStateStatus(version=stored.version, authentic=False)
    authentic: bool | None = None
    try:
        authentic = _verified(stored, farm, directory)
    except FarmStateError as exc:
        problems.add("critical", exc.diagnostics())
        return FarmStateStatus(state.version, state.master_key, authentic=False)
    except DirectoryError as exc:
        problems.add("warning", f"cannot verify the farm state record: {exc.what}")
    _check_columns(stored, state, table_current, problems)
    error = farm_state.mismatch(state, live)
    if error is not None:
        authentic = False
        problems.add("critical", error.diagnostics())
    for n in nodes:
        if n.state_version is not None and n.state_version > state.version:
            problems.add(
                "critical",
                f"node {n.id} installed farm state version {n.state_version}, newer than the"
                f" config DB's {state.version} (a restored backup?) — {farm_state.REPAIR}",
            )
    holds = () if authentic is False else _holds(state, live, policy, problems)
    return FarmStateStatus(state.version, state.master_key, authentic, holds)


def _holds(
    state: farm_state.FarmState,
    live: Sequence[CertificateRow],
    policy: PolicyConfig,
    problems: Problems,
) -> tuple[PromotionHold, ...]:
    """Each promotion a revert holds, with the warning that says until when."""
    found = []
    for hold in state.holds:
        primary = next((r for r in live if r.purpose == hold.purpose and r.role == "primary"), None)
        until = (
            None if primary is None else primary.not_after - policy.units(policy.critical_threshold)
        )
        since = datetime.fromtimestamp(hold.since, UTC)
        found.append(PromotionHold(hold.purpose, hold.secondary, since, until))
        end = "" if until is None else f" at {until:%Y-%m-%dT%H:%M:%SZ}"
        problems.add(
            "warning",
            f"{hold.purpose} promotion held since the revert of {since:%Y-%m-%dT%H:%M:%SZ}"
            f" until `farmkeys rollover` or the critical threshold{end} — once the relying"
            " parties have the new key, run `farmkeys rollover`",
        )
    return tuple(found)


def _newest(nodes: Sequence[NodeStatus]) -> int | None:
    """The newest farm state version any node says it installed."""
    return max((n.state_version for n in nodes if n.state_version is not None), default=None)


def _missing(newest: int | None, problems: Problems) -> FarmStateStatus:
    """No record: critical when a node installed one, else a farm from before them."""
    if newest is not None:
        problems.add(
            "critical",
            f"the config DB has no farm state record, but nodes installed version {newest}"
            f" — {farm_state.REPAIR}",
        )
        return FarmStateStatus(authentic=False)
    problems.add(
        "warning",
        "the config DB has no farm state record yet (a farm from before them); the"
        " leader writes it at its next check, or run `farmkeys repair-state`",
    )
    return FarmStateStatus()


def _verified(stored: StoredState, farm: Farm, directory: Directory | None) -> bool | None:
    """True when the record's MAC verifies under its master key; None without a directory
    (raising FarmStateError when it does not verify, DirectoryError when the key cannot
    be read)."""
    if directory is None:
        return None
    farm_state.verify(
        stored.body,
        stored.mac,
        farm=farm.dkm_group,
        key_for=lambda key_id: directory.master_key(farm.dkm_group, key_id),
    )
    return True


def _check_columns(
    stored: StoredState,
    state: farm_state.FarmState,
    table_current: MasterKeyRow | None,
    problems: Problems,
) -> None:
    """The unauthenticated columns beside the record must say what the record says."""
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
