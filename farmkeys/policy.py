"""Rollover decisions: AD FS's AutoCertificateRollover as a pure function.

:func:`decide` maps (policy, now, certificate rows) to the actions that are
due; :func:`next_action` tells ``farmkeys status`` what will happen next to
one certificate and when. Neither does I/O nor reads a clock: ``now`` is a
timezone-aware datetime passed in (the leader passes the database's clock).

Thresholds are in threshold units (``policy.units``, one day by default):
``G`` = generation_threshold, ``M`` = promotion_threshold, ``C`` =
critical_threshold. Every boundary is inclusive: at exactly the boundary
instant the action is due, one second earlier it is not.

Each purpose (``signing``, ``decryption``) is decided on its own, from its
rows alone. Archived rows are ignored. A purpose may have at most one
primary and one secondary (the database enforces it; :func:`decide` raises
:class:`ValueError` if the rows say otherwise).

1. Every retired row R with ``now >= R.not_after`` is archived.
2. A secondary S is *usable* when ``S.not_before <= now < S.not_after``.
   An unusable secondary is archived (the reason says whether it expired or
   is not valid yet) and from then on treated as absent.
3. No primary: a usable secondary S is promoted; without one, a new
   certificate is generated and promoted at once (also on an empty farm).
4. A primary P and no usable secondary:

   - ``now >= P.not_after - C``: generate and promote at once (this covers
     a P that has already expired);
   - else ``now >= P.not_after - G``: generate a secondary.

5. A primary P and a usable secondary S:

   - ``now >= S.created_at + M``: promote S, except that with
     ``policy.require_fetch`` a *signing* S waits while a relying party has not
     fetched it (``unfetched[S.id]`` names them), and that S waits while a revert
     holds it (``held``: the farm state record's holds, see :func:`revert`);
   - else ``now >= P.not_after - C``: promote S at once, since a usable
     successor exists inside the critical window (fetched or not, as AD FS
     would).

6. Anything else: nothing is due for that purpose.

:func:`revert` decides whether `farmkeys rollover --revert` may undo a purpose's last
promotion, from the farm state record's account of it.

The returned list holds every archive first (signing before decryption,
oldest ``not_after`` first), then at most one other action per purpose
(signing before decryption).

Whoever applies the actions retires the replaced primary on ``promote`` and
``generate_and_promote``, and gives a generated certificate ``created_at =
not_before = now`` (``not_before`` may be earlier, never later, or the new
secondary is not usable and would be archived and generated again). With
that, :func:`decide` converges: called again at the same ``now`` it never
repeats an action. It may add a follow-up instead, which is why the applier
calls it until it returns ``[]``: a primary replaced after its ``not_after``
is retired by the applier and archived by the next call; a secondary
promoted inside its own critical window is replaced by the next call. It
settles within three calls that return actions.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal, Protocol, TypeVar

from farmkeys.config import MasterKeyConfig, PolicyConfig
from farmkeys.errors import RevertRefusedError
from farmkeys.formats.certificate_row import Published, Row
from farmkeys.vocab import PURPOSES, ROLES

ActionKind = Literal["generate", "promote", "generate_and_promote", "archive"]
ScheduledKind = Literal[
    "generate_secondary", "promote", "retire", "archive", "generate_and_promote", "reseal", "shred"
]
KeyActionKind = Literal["finish", "roll", "reseal", "unused", "delete"]

_SECONDS_PER_DAY: Final = 86400


class CertificateView(Row, Protocol):
    """What the policy reads of a certificate row."""

    @property
    def not_before(self) -> datetime: ...
    @property
    def not_after(self) -> datetime: ...
    @property
    def created_at(self) -> datetime: ...


class RevertView(CertificateView, Published, Protocol):
    """What :func:`revert` reads of a certificate row: its dates and its thumbprint."""


class MasterKeyView(Protocol):
    """What the policy reads of a master key's record (``db.MasterKeyRow`` has it)."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def stage(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def unused_since(self) -> datetime | None: ...
    @property
    def delete_now(self) -> bool: ...


class PromotionView(Protocol):
    """What :func:`revert` reads of a purpose's last promotion, as the authenticated farm
    state record keeps it (``farm_state.Promotion`` has it; times in epoch seconds)."""

    @property
    def at(self) -> int: ...
    @property
    def primary(self) -> uuid.UUID: ...
    @property
    def previous(self) -> uuid.UUID | None: ...
    @property
    def urgent(self) -> bool: ...


@dataclass(frozen=True)
class Revert:
    """What `rollover --revert` does to one purpose: ``primary`` (the certificate the last
    promotion retired) is made primary again, ``secondary`` (the primary that promotion
    made) secondary, and its scheduled promotion is held."""

    purpose: str
    primary: RevertView
    secondary: RevertView


@dataclass(frozen=True)
class KeyAction:
    """One master-key step that is due now, with one sentence for the audit log."""

    kind: KeyActionKind
    key_id: uuid.UUID
    reason: str


@dataclass(frozen=True)
class KeySchedule:
    """When the current key is rolled (``roll_at``) or a previous one deleted (``delete_at``).

    ``delete_at`` is None while a live blob still names the key."""

    roll_at: datetime | None
    delete_at: datetime | None


@dataclass(frozen=True)
class Action:
    """One step that is due now.

    ``certificate_id`` is the row acted on: the secondary for ``promote``, the
    row for ``archive``, ``None`` for ``generate`` and ``generate_and_promote``
    (the certificate does not exist yet). ``reason`` is one sentence for the
    audit log and the operator.
    """

    kind: ActionKind
    purpose: str
    certificate_id: uuid.UUID | None
    reason: str


@dataclass(frozen=True)
class Scheduled:
    """The next thing that happens to one certificate, and when (possibly already past)."""

    action: ScheduledKind
    at: datetime


def decide(
    policy: PolicyConfig,
    now: datetime,
    rows: Sequence[CertificateView],
    *,
    unfetched: Mapping[uuid.UUID, Sequence[str]] | None = None,
    held: Collection[uuid.UUID] = (),
) -> list[Action]:
    """The actions due at ``now``, archives first; ``[]`` when nothing is due.

    ``unfetched``: for a secondary, the relying parties that have not fetched it
    (:func:`unfetched_by`); read only with ``policy.require_fetch``. ``held``: the
    secondaries a revert holds, promoted only at the primary's critical threshold."""
    _require_aware("now", now)
    archives: list[Action] = []
    steps: list[Action] = []
    for purpose, live in _by_purpose(rows).items():
        for retired in sorted(live.retired, key=lambda r: (r.not_after, str(r.id))):
            if now >= retired.not_after:
                archives.append(
                    Action(
                        "archive",
                        purpose,
                        retired.id,
                        f"the retired certificate expired at {_iso(retired.not_after)}",
                    )
                )
        secondary = live.secondary
        if secondary is not None and not _usable(secondary, now):
            archives.append(
                Action("archive", purpose, secondary.id, _unusable_reason(secondary, now))
            )
            secondary = None
        waiting = _waiting(policy, purpose, secondary, unfetched)
        hold = secondary is not None and secondary.id in held
        step = _step(policy, now, purpose, live.primary, secondary, waiting, held=hold)
        if step is not None:
            steps.append(step)
    return archives + steps


def next_action(
    policy: PolicyConfig,
    now: datetime,
    rows: Sequence[CertificateView],
    certificate_id: uuid.UUID,
    *,
    unfetched: Mapping[uuid.UUID, Sequence[str]] | None = None,
    held: Collection[uuid.UUID] = (),
) -> Scheduled | None:
    """The next scheduled action of one certificate, by the rules of :func:`decide`.

    - primary without a usable secondary: ``generate_secondary`` at
      ``P.not_after - G`` (overdue once that has passed, as the next check
      will generate); from the critical moment on (or when the two coincide),
      ``generate_and_promote`` at ``P.not_after - C``;
    - primary with a usable secondary: ``retire`` when the secondary is
      promoted, at ``min(S.created_at + M, P.not_after - C)``;
    - usable secondary: ``promote`` at that same moment, or at ``now`` when
      there is no primary; an unusable secondary: ``archive`` at ``now``;
    - retired: ``archive`` at its ``not_after``;
    - archived, or an id not among ``rows``: ``None``.

    ``at`` may lie in the past: the action is then overdue.
    """
    _require_aware("now", now)
    by_purpose = _by_purpose(rows)
    row = next((r for r in rows if r.id == certificate_id), None)
    if row is None or row.role == "archived":
        return None
    live = by_purpose[row.purpose]
    if row.role == "retired":
        return Scheduled("archive", row.not_after)
    if row.role == "secondary":
        if not _usable(row, now):
            return Scheduled("archive", now)
        if live.primary is None:
            return Scheduled("promote", now)
        waiting = _waiting(policy, row.purpose, row, unfetched)
        return Scheduled(
            "promote", _promotion_at(policy, live.primary, row, waiting, held=row.id in held)
        )
    # The primary.
    secondary = live.secondary
    if secondary is not None and _usable(secondary, now):
        waiting = _waiting(policy, row.purpose, secondary, unfetched)
        return Scheduled(
            "retire", _promotion_at(policy, row, secondary, waiting, held=secondary.id in held)
        )
    generation_at = row.not_after - policy.units(policy.generation_threshold)
    critical_at = row.not_after - policy.units(policy.critical_threshold)
    if generation_at < critical_at and now < critical_at:
        return Scheduled("generate_secondary", generation_at)  # overdue once generation_at passed
    return Scheduled("generate_and_promote", critical_at)


def revert(
    policy: PolicyConfig,
    now: datetime,
    rows: Sequence[RevertView],
    purpose: str,
    *,
    promotion: PromotionView | None,
    revoked: Collection[str],
    held_since: int | None = None,
) -> Revert:
    """Whether ``purpose``'s last promotion may be undone at ``now``, and how.

    ``rows``: the live certificates (their ``not_after`` as the certificate itself says).
    ``promotion``: the purpose's last promotion and ``revoked`` the urgently replaced
    thumbprints, both from the authenticated farm state record; ``held_since``: the time
    of a revert that holds the purpose now (epoch seconds). Allowed while the certificate
    that promotion retired is live as retired, not revoked, and not yet inside its
    critical threshold (where the policy would promote again at once), and the purpose has
    no other secondary; else :class:`RevertRefusedError`, one line saying why.
    """
    _require_aware("now", now)
    unchanged = "nothing was changed"
    _by_purpose(rows)  # refuses rows that make no sense
    mine = [r for r in rows if r.purpose == purpose]
    primary = next((r for r in mine if r.role == "primary"), None)
    secondary = next((r for r in mine if r.role == "secondary"), None)
    retired = [r for r in mine if r.role == "retired"]
    if promotion is None:
        if held_since is not None:
            raise RevertRefusedError(
                f"{purpose}: the last promotion was already reverted at {_epoch(held_since)}",
                "its promotion is held until `farmkeys rollover` releases it or the critical"
                f" threshold is reached; {unchanged}",
            )
        raise RevertRefusedError(
            f"{purpose}: the farm state records no promotion to revert",
            "only a promotion made by a farmkeys that records them (farm state format 3) can"
            f" be reverted; {unchanged}",
        )
    previous = next((r for r in retired if r.id == promotion.previous), None)
    if promotion.urgent or (previous is not None and previous.thumbprint in revoked):
        raise RevertRefusedError(
            f"{purpose}: the primary was last replaced by an urgent rollover at"
            f" {_epoch(promotion.at)}; the certificate it replaced is revoked and never comes"
            " back",
            f"an urgent rollover is meant and cannot be reverted; {unchanged}",
        )
    if promotion.previous is None:
        raise RevertRefusedError(
            f"{purpose}: the last promotion (at {_epoch(promotion.at)}) replaced no primary",
            f"there is no certificate to go back to; {unchanged}",
        )
    if primary is None or primary.id != promotion.primary:
        raise RevertRefusedError(
            f"{purpose}: the primary is not the certificate the last promotion made",
            f"run `farmkeys status` and `farmkeys events` to see what changed; {unchanged}",
        )
    if previous is None:
        raise RevertRefusedError(
            f"{purpose}: the certificate the last promotion retired ({promotion.previous}) is"
            " archived",
            f"an archived certificate is never made primary again; {unchanged}",
        )
    if now >= previous.not_after:
        raise RevertRefusedError(
            f"{purpose}: the certificate the last promotion retired, {previous.thumbprint},"
            f" expired at {_iso(previous.not_after)}",
            f"an expired certificate cannot sign or decrypt; {unchanged}",
        )
    critical_at = previous.not_after - policy.units(policy.critical_threshold)
    if now >= critical_at:
        raise RevertRefusedError(
            f"{purpose}: the certificate the last promotion retired, {previous.thumbprint},"
            f" expires at {_iso(previous.not_after)}, within"
            f" {_threshold('critical_threshold', policy.critical_threshold, policy)}, so the"
            " policy would promote again at once",
            f"the promotion stands; {unchanged}",
        )
    if secondary is not None:
        raise RevertRefusedError(
            f"{purpose}: there is a secondary, {secondary.thumbprint}, besides the"
            " primary; a revert needs its place for the primary it demotes",
            f"a promotion can be reverted only before a new secondary is made; {unchanged}",
        )
    return Revert(purpose, previous, primary)


def unfetched_by(
    parties: Sequence[str],
    fetched: Collection[tuple[str, str]],
    rows: Iterable[Published],
) -> dict[uuid.UUID, tuple[str, ...]]:
    """For each signing secondary among ``rows``: which of ``parties`` have not fetched it,
    by the ``(relying party, thumbprint)`` pairs in ``fetched``; absent when all have."""
    found = {}
    for row in rows:
        if row.purpose != "signing" or row.role != "secondary":
            continue
        missing = tuple(p for p in parties if (p, row.thumbprint) not in fetched)
        if missing:
            found[row.id] = missing
    return found


K = TypeVar("K", bound=MasterKeyView)


def current_key(keys: Iterable[K]) -> K | None:
    """The key whose stage is ``current`` (the database allows one), or None."""
    return next((k for k in keys if k.stage == "current"), None)


def decide_master_keys(
    master: MasterKeyConfig,
    policy: PolicyConfig,
    now: datetime,
    keys: Sequence[MasterKeyView],
    named_by_live: Collection[uuid.UUID],
) -> list[KeyAction]:
    """The master-key steps due at ``now`` by the rules in the module's docstring.

    ``named_by_live``: the ids of the master keys the live blobs are sealed
    under. A pending key returns ``finish`` alone; nothing else is decided
    until the roll is done. ``[]`` when the farm has no current key (the
    leader adopts the directory's keys first).
    """
    _require_aware("now", now)
    pending = [k for k in keys if k.stage == "pending"]
    if pending:
        return [KeyAction("finish", pending[0].id, "a master-key roll was begun and not finished")]
    current = current_key(keys)
    if current is None:
        return []
    actions: list[KeyAction] = []
    schedule = master_key_schedule(master, policy, now, keys, named_by_live)
    roll_at = schedule[current.id].roll_at
    assert roll_at is not None
    if now >= roll_at:
        lifetime = _threshold("lifetime", master.lifetime, policy)
        actions.append(
            KeyAction("roll", current.id, f"the current master key reached its {lifetime}")
        )
    elif set(named_by_live) - {current.id}:
        actions.append(
            KeyAction("reseal", current.id, "live blobs are sealed under a key that is not current")
        )
    for key in keys:
        if key.stage != "previous" or key.id in named_by_live:
            continue
        if key.unused_since is None:
            actions.append(KeyAction("unused", key.id, "no live blob names it any more"))
            continue
        delete_at = schedule[key.id].delete_at
        if delete_at is not None and now >= delete_at:
            why = (
                "replaced urgently"
                if key.delete_now
                else f"no live blob named it for {_threshold('retain', master.retain, policy)}"
            )
            actions.append(KeyAction("delete", key.id, why))
    return actions


def master_key_schedule(
    master: MasterKeyConfig,
    policy: PolicyConfig,
    now: datetime,
    keys: Sequence[MasterKeyView],
    named_by_live: Collection[uuid.UUID],
) -> dict[uuid.UUID, KeySchedule]:
    """For every key that is not deleted: when it is rolled or deleted (maybe already past).

    A previous key not yet marked unused but named by no live blob counts as
    unused from ``now``.
    """
    _require_aware("now", now)
    found: dict[uuid.UUID, KeySchedule] = {}
    for key in keys:
        if key.stage == "current":
            found[key.id] = KeySchedule(key.created_at + policy.units(master.lifetime), None)
        elif key.stage == "previous":
            if key.id in named_by_live:
                found[key.id] = KeySchedule(None, None)
                continue
            since = key.unused_since or now
            at = since if key.delete_now else since + policy.units(master.retain)
            found[key.id] = KeySchedule(None, at)
        elif key.stage == "pending":
            found[key.id] = KeySchedule(None, None)
    return found


# --- internals -------------------------------------------------------------


@dataclass
class _Live:
    """The rows of one purpose that are not archived."""

    primary: CertificateView | None = None
    secondary: CertificateView | None = None
    retired: list[CertificateView] = field(default_factory=list)


def _by_purpose(rows: Sequence[CertificateView]) -> dict[str, _Live]:
    """The live rows grouped by purpose (every purpose present), checked for sense."""
    grouped = {purpose: _Live() for purpose in PURPOSES}
    for row in rows:
        if row.purpose not in grouped:
            raise ValueError(f"certificate {row.id} has an unknown purpose {row.purpose!r}")
        if row.role not in ROLES:
            raise ValueError(f"certificate {row.id} has an unknown role {row.role!r}")
        if row.role == "archived":
            continue
        for name in ("not_before", "not_after", "created_at"):
            _require_aware(f"certificate {row.id} {name}", getattr(row, name))
        live = grouped[row.purpose]
        if row.role == "retired":
            live.retired.append(row)
            continue
        held = live.primary if row.role == "primary" else live.secondary
        if held is not None:
            raise ValueError(
                f"{row.purpose} has two {row.role} certificates ({held.id} and {row.id}); "
                "there may be at most one"
            )
        if row.role == "primary":
            live.primary = row
        else:
            live.secondary = row
    return grouped


def _waiting(
    policy: PolicyConfig,
    purpose: str,
    secondary: CertificateView | None,
    unfetched: Mapping[uuid.UUID, Sequence[str]] | None,
) -> tuple[str, ...]:
    """The relying parties a secondary's promotion waits for (none without require_fetch)."""
    if not policy.require_fetch or purpose != "signing" or secondary is None or not unfetched:
        return ()
    return tuple(unfetched.get(secondary.id, ()))


def _step(
    policy: PolicyConfig,
    now: datetime,
    purpose: str,
    primary: CertificateView | None,
    secondary: CertificateView | None,
    waiting: Sequence[str] = (),
    *,
    held: bool = False,
) -> Action | None:
    """The one non-archive action due for a purpose; ``secondary`` is usable or ``None``,
    ``held`` when a revert holds its promotion."""
    if primary is None:
        if secondary is not None:
            return Action(
                "promote",
                purpose,
                secondary.id,
                f"there is no primary and the secondary has been valid since "
                f"{_iso(secondary.not_before)}",
            )
        return Action(
            "generate_and_promote",
            purpose,
            None,
            "there is neither a primary nor a usable secondary",
        )
    critical = policy.units(policy.critical_threshold)
    in_critical = now >= primary.not_after - critical
    if secondary is None:
        if in_critical:
            return Action(
                "generate_and_promote",
                purpose,
                None,
                f"{_nearness(primary, now, policy)} and there is no usable secondary",
            )
        generation = policy.units(policy.generation_threshold)
        if now >= primary.not_after - generation:
            return Action(
                "generate",
                purpose,
                None,
                f"the primary expires at {_iso(primary.not_after)}, within "
                f"{_threshold('generation_threshold', policy.generation_threshold, policy)}",
            )
        return None
    promotion = policy.units(policy.promotion_threshold)
    if now >= secondary.created_at + promotion and not waiting and not held:
        return Action(
            "promote",
            purpose,
            secondary.id,
            f"the secondary was generated at {_iso(secondary.created_at)}, at least "
            f"{_threshold('promotion_threshold', policy.promotion_threshold, policy)} ago",
        )
    if in_critical:
        unseen = f" (not yet fetched by {', '.join(waiting)})" if waiting else ""
        if held:
            unseen += " (its promotion was held by a revert)"
        return Action(
            "promote",
            purpose,
            secondary.id,
            f"{_nearness(primary, now, policy)} and the secondary is ready to replace it" + unseen,
        )
    return None


def _promotion_at(
    policy: PolicyConfig,
    primary: CertificateView,
    secondary: CertificateView,
    waiting: Sequence[str] = (),
    *,
    held: bool = False,
) -> datetime:
    critical_at = primary.not_after - policy.units(policy.critical_threshold)
    if waiting or held:
        return critical_at
    return min(secondary.created_at + policy.units(policy.promotion_threshold), critical_at)


def _usable(secondary: CertificateView, now: datetime) -> bool:
    return secondary.not_before <= now < secondary.not_after


def _unusable_reason(secondary: CertificateView, now: datetime) -> str:
    if now >= secondary.not_after:
        return f"the secondary expired at {_iso(secondary.not_after)} before it was promoted"
    return f"the secondary is not valid until {_iso(secondary.not_before)}"


def _nearness(primary: CertificateView, now: datetime, policy: PolicyConfig) -> str:
    """How close the primary is to its end, once inside the critical window."""
    if now >= primary.not_after:
        return f"the primary expired at {_iso(primary.not_after)}"
    return (
        f"the primary expires at {_iso(primary.not_after)}, within "
        f"{_threshold('critical_threshold', policy.critical_threshold, policy)},"
    )


def describe_units(n: int, policy: PolicyConfig) -> str:
    """``n`` threshold units for a person: "365 days", or "40 × 1 s" in a test's units."""
    if policy.threshold_unit_seconds == _SECONDS_PER_DAY:
        return f"{n} day{'' if n == 1 else 's'}"
    return f"{n} × {policy.threshold_unit_seconds} s"


def _threshold(name: str, n: int, policy: PolicyConfig) -> str:
    return f"{name} ({describe_units(n, policy)})"


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat()


def _epoch(seconds: int) -> str:
    return _iso(datetime.fromtimestamp(seconds, UTC))


def _require_aware(name: str, when: datetime) -> None:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, not {when!r}")
