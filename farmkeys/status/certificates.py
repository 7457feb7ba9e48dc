"""The certificates as status shows them: how near each primary is to its end, and the
next thing that happens to each certificate."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from farmkeys import policy as rollover_policy
from farmkeys.config import PolicyConfig
from farmkeys.db import CertificateRow
from farmkeys.status.document import CertificateStatus, NextAction
from farmkeys.status.problems import Problems, human
from farmkeys.vocab import LIVE_ROLES, PURPOSES

Schedule = dict[uuid.UUID, rollover_policy.KeySchedule]
Unfetched = dict[uuid.UUID, tuple[str, ...]]


def check_expiry(
    policy: PolicyConfig, now: datetime, live: Sequence[CertificateRow], problems: Problems
) -> None:
    """Each purpose needs a primary, not expired, outside the critical threshold, and a
    secondary once inside the generation threshold."""
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
                f" {human(left)}, inside the critical threshold",
            )
        elif left <= policy.units(policy.generation_threshold) and secondary is None:
            problems.add(
                "warning",
                f"the primary {purpose} certificate {primary.thumbprint} expires in"
                f" {human(left)} and has no secondary yet",
            )


def certificate_statuses(
    policy: PolicyConfig,
    now: datetime,
    rows: Sequence[CertificateRow],
    current_key: uuid.UUID | None,
    schedule: Schedule,
    unfetched: Unfetched,
    *,
    held: frozenset[uuid.UUID] = frozenset(),
) -> tuple[CertificateStatus, ...]:
    """Every certificate row, live and archived, with its next action (``held``: the
    secondaries a revert holds)."""
    live = [r for r in rows if r.role in LIVE_ROLES]
    return tuple(
        _status(r, _next(policy, now, live, r, current_key, schedule, unfetched, held))
        for r in rows
    )


def _next(
    policy: PolicyConfig,
    now: datetime,
    live: Sequence[CertificateRow],
    row: CertificateRow,
    current_key: uuid.UUID | None,
    schedule: Schedule,
    unfetched: Unfetched,
    held: frozenset[uuid.UUID],
) -> NextAction | None:
    """The next thing that happens to a certificate: a rollover step, a re-seal of its blob
    when the master key rolls, or, for an archived one, its shredding."""
    keys = schedule.get(row.master_key)
    if row.role not in LIVE_ROLES:
        if keys is None or keys.delete_at is None:
            return None
        return NextAction("shred", keys.delete_at)
    scheduled = rollover_policy.next_action(
        policy, now, live, row.id, unfetched=unfetched, held=held
    )
    found = None if scheduled is None else NextAction(scheduled.action, scheduled.at)
    if current_key is not None and row.master_key != current_key:
        # a roll in progress or cut short: the next check re-seals it
        found = NextAction("reseal", now)
    elif (
        keys is not None and keys.roll_at is not None and (found is None or keys.roll_at < found.at)
    ):
        found = NextAction("reseal", keys.roll_at)
    return found


def _status(row: CertificateRow, next_action: NextAction | None) -> CertificateStatus:
    return CertificateStatus(
        id=row.id,
        purpose=row.purpose,
        role=row.role,
        thumbprint=row.thumbprint,
        sha256=row.sha256,
        subject=row.subject,
        key_type=row.key_type,
        not_before=row.not_before,
        not_after=row.not_after,
        master_key=row.master_key,
        created_at=row.created_at,
        next_action=next_action,
    )
