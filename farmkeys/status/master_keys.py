"""The master keys as status shows them: every key the farm recorded or the directory
holds, what each seals, when it rolls or is deleted, and what is wrong with them."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

from farmkeys import policy as rollover_policy
from farmkeys.config import Config
from farmkeys.db import CertificateRow, MasterKeyRow
from farmkeys.directory import Directory, MasterKeyInfo
from farmkeys.errors import DirectoryError, MasterKeyMissingError
from farmkeys.status.document import MasterKeyStatus, iso
from farmkeys.status.problems import Problems
from farmkeys.vocab import LIVE_ROLES

Schedule = dict[uuid.UUID, rollover_policy.KeySchedule]


def keys_in_directory(
    directory: Directory | None, group: uuid.UUID, problems: Problems
) -> list[MasterKeyInfo] | None:
    """The master keys the directory holds; None when there is no directory or it cannot
    be listed (a problem, not an error). On Active Directory, also whether the farm's
    container is protected."""
    if directory is None:
        return None
    try:
        found = directory.list_keys(group)
    except MasterKeyMissingError as exc:  # the whole DKM container is gone
        problems.add("critical", f"no live certificate can be opened: {exc.what}")
        return None
    except DirectoryError as exc:
        problems.add("warning", f"cannot list master keys: {exc.what}")
        return None
    _check_protection(directory, group, problems)
    return found


def _check_protection(directory: Directory, group: uuid.UUID, problems: Problems) -> None:
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


def master_keys(
    config: Config,
    now: datetime,
    recorded: Sequence[MasterKeyRow],
    in_directory: Sequence[MasterKeyInfo] | None,
    rows: Sequence[CertificateRow],
    problems: Problems,
) -> tuple[tuple[MasterKeyStatus, ...], Schedule]:
    """Every master key the farm recorded or the directory holds, and the problems they show;
    and when each is rolled or deleted.

    ``in_directory`` is None when the directory could not be listed."""
    live = [r for r in rows if r.role in LIVE_ROLES]
    named = {r.master_key for r in live}
    schedule = rollover_policy.master_key_schedule(
        config.master_key, config.policy, now, recorded, named
    )
    present = None if in_directory is None else {k.id: k for k in in_directory}
    by_id = {k.id: k for k in recorded}
    found = []
    for key_id in [*by_id, *(k for k in present or {} if k not in by_id)]:
        key = _key_status(key_id, by_id.get(key_id), present, rows, schedule)
        found.append(key)
        _check_key(config, now, key, by_id.get(key_id), bool(recorded), problems)
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
    return tuple(found), schedule


def _key_status(
    key_id: uuid.UUID,
    record: MasterKeyRow | None,
    present: Mapping[uuid.UUID, MasterKeyInfo] | None,
    rows: Sequence[CertificateRow],
    schedule: Schedule,
) -> MasterKeyStatus:
    info = None if present is None else present.get(key_id)
    times = schedule.get(key_id)
    created = record.created_at if record else (info.created_at if info else None)
    return MasterKeyStatus(
        id=key_id,
        created_at=created,
        current=record.stage == "current" if record else False,
        state=record.stage if record else "unrecorded",
        in_directory=None if present is None else info is not None,
        sealed_live=sum(1 for r in rows if r.role in LIVE_ROLES and r.master_key == key_id),
        sealed_archived=sum(1 for r in rows if r.role == "archived" and r.master_key == key_id),
        roll_at=times.roll_at if times else None,
        delete_at=times.delete_at if times else None,
    )


def _check_key(
    config: Config,
    now: datetime,
    key: MasterKeyStatus,
    record: MasterKeyRow | None,
    any_recorded: bool,
    problems: Problems,
) -> None:
    """The problems one master key shows (``any_recorded``: the farm records its keys)."""
    if record is None and any_recorded:
        problems.add(
            "warning",
            f"master key {key.id} is in the directory but the farm has no record of it;"
            " it was not made by this farm's leader",
        )
    if key.sealed_live and key.in_directory is False:
        problems.add(
            "critical",
            f"master key {key.id}, which {key.sealed_live} live certificates need, is missing"
            " from the directory",
        )
    if key.roll_at is not None and now >= key.roll_at:
        problems.add(
            "warning",
            f"the current master key {key.id} is past its lifetime (due {iso(key.roll_at)});"
            " is the leader running and the directory reachable?",
        )
    if record is not None and record.stage != "current" and key.sealed_live:
        since = record.replaced_at or record.created_at
        late = timedelta(seconds=config.policy.rollover_interval_seconds)
        if now - since > late:
            problems.add(
                "warning",
                f"{key.sealed_live} live blobs are still sealed under master key {key.id},"
                f" which is {record.stage}, since {iso(since)}",
            )
