"""The rollover policy: every boundary to the second, convergence, and a simulated lifetime."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from farmkeys.config import PolicyConfig
from farmkeys.db import CertificateRow
from farmkeys.policy import Action, Scheduled, decide, next_action

ANCHOR = datetime(2027, 11, 1, tzinfo=UTC)

# AD FS's defaults, in days and with a day shrunk to one second.
DAYS = PolicyConfig(
    certificate_duration=365,
    generation_threshold=20,
    promotion_threshold=5,
    critical_threshold=2,
    threshold_unit_seconds=86400,
)
SECONDS = dataclasses.replace(DAYS, threshold_unit_seconds=1)

# The simulated lifetime's policy: a certificate lives 20 s.
SHORT = PolicyConfig(
    certificate_duration=20,
    generation_threshold=8,
    promotion_threshold=4,
    critical_threshold=2,
    threshold_unit_seconds=1,
)


@dataclass(frozen=True)
class Row:
    """A certificate row as the policy sees it."""

    id: uuid.UUID
    purpose: str
    role: str
    not_before: datetime
    not_after: datetime
    created_at: datetime


def new_row(
    role: str,
    *,
    created: datetime,
    not_after: datetime,
    not_before: datetime | None = None,
    purpose: str = "signing",
) -> Row:
    return Row(
        id=uuid.uuid4(),
        purpose=purpose,
        role=role,
        not_before=created if not_before is None else not_before,
        not_after=not_after,
        created_at=created,
    )


def only(actions: list[Action], purpose: str) -> list[Action]:
    return [a for a in actions if a.purpose == purpose]


# --- the boundary table ----------------------------------------------------
#
# Times are (units, seconds) from ANCHOR, so one table serves both policies:
# with DAYS a unit is a day, with SECONDS it is a second; the extra seconds
# are always real seconds. Rows are labelled so expectations can name them.


@dataclass(frozen=True)
class Spec:
    label: str
    role: str
    created: int
    not_after: int
    not_before: int | None = None


@dataclass(frozen=True)
class Case:
    rows: tuple[Spec, ...]
    now: tuple[int, int]
    expected: tuple[tuple[str, str | None], ...]  # (kind, label of the row acted on)


PRIMARY = Spec("P", "primary", created=-365, not_after=0)
FRESH_PRIMARY = Spec("P", "primary", created=-10, not_after=355)
SECONDARY_ON_TIME = Spec("S", "secondary", created=-20, not_after=345)  # generated at P - 20
SECONDARY_LATE = Spec("S", "secondary", created=-3, not_after=362)  # M ends after P - C
RETIRED = Spec("R", "retired", created=-365, not_after=0)
EXPIRING_SECONDARY = Spec("S", "secondary", created=-365, not_after=0)
FUTURE_SECONDARY = Spec("S", "secondary", created=-1, not_before=0, not_after=365)

GENERATE = (("generate", None),)
GENERATE_AND_PROMOTE = (("generate_and_promote", None),)
PROMOTE = (("promote", "S"),)
NOTHING: tuple[tuple[str, str | None], ...] = ()

CASES = {
    # generation_threshold: 20 units before the primary's NotAfter.
    "no_secondary_is_generated_one_second_before_generation_threshold": Case(
        (PRIMARY,), (-20, -1), NOTHING
    ),
    "secondary_is_generated_exactly_generation_threshold_before_not_after": Case(
        (PRIMARY,), (-20, 0), GENERATE
    ),
    "secondary_is_generated_one_second_after_generation_threshold": Case(
        (PRIMARY,), (-20, 1), GENERATE
    ),
    # critical_threshold without a usable successor.
    "without_secondary_only_generate_one_second_before_critical_threshold": Case(
        (PRIMARY,), (-2, -1), GENERATE
    ),
    "without_secondary_generate_and_promote_exactly_at_critical_threshold": Case(
        (PRIMARY,), (-2, 0), GENERATE_AND_PROMOTE
    ),
    "without_secondary_generate_and_promote_one_second_after_critical_threshold": Case(
        (PRIMARY,), (-2, 1), GENERATE_AND_PROMOTE
    ),
    # An expired primary without a secondary.
    "primary_one_second_before_not_after_without_secondary_is_replaced": Case(
        (PRIMARY,), (0, -1), GENERATE_AND_PROMOTE
    ),
    "primary_exactly_at_not_after_without_secondary_is_replaced": Case(
        (PRIMARY,), (0, 0), GENERATE_AND_PROMOTE
    ),
    "expired_primary_without_secondary_is_replaced": Case((PRIMARY,), (0, 1), GENERATE_AND_PROMOTE),
    # promotion_threshold: 5 units after the secondary was generated.
    "secondary_is_not_promoted_one_second_before_promotion_threshold": Case(
        (PRIMARY, SECONDARY_ON_TIME), (-15, -1), NOTHING
    ),
    "secondary_is_promoted_exactly_promotion_threshold_after_generation": Case(
        (PRIMARY, SECONDARY_ON_TIME), (-15, 0), PROMOTE
    ),
    "secondary_is_promoted_one_second_after_promotion_threshold": Case(
        (PRIMARY, SECONDARY_ON_TIME), (-15, 1), PROMOTE
    ),
    # critical_threshold with a usable successor that is not due for promotion yet.
    "young_secondary_waits_one_second_before_critical_threshold": Case(
        (PRIMARY, SECONDARY_LATE), (-2, -1), NOTHING
    ),
    "young_secondary_is_promoted_exactly_at_critical_threshold": Case(
        (PRIMARY, SECONDARY_LATE), (-2, 0), PROMOTE
    ),
    "young_secondary_is_promoted_one_second_after_critical_threshold": Case(
        (PRIMARY, SECONDARY_LATE), (-2, 1), PROMOTE
    ),
    "expired_primary_with_usable_secondary_promotes_it": Case(
        (PRIMARY, SECONDARY_LATE), (0, 1), PROMOTE
    ),
    # A retired certificate is archived at its NotAfter.
    "retired_is_kept_one_second_before_not_after": Case((FRESH_PRIMARY, RETIRED), (0, -1), NOTHING),
    "retired_is_archived_exactly_at_not_after": Case(
        (FRESH_PRIMARY, RETIRED), (0, 0), (("archive", "R"),)
    ),
    "retired_is_archived_one_second_after_not_after": Case(
        (FRESH_PRIMARY, RETIRED), (0, 1), (("archive", "R"),)
    ),
    # No primary.
    "no_certificates_at_all_generate_and_promote": Case((), (0, 0), GENERATE_AND_PROMOTE),
    "no_primary_and_usable_secondary_promotes_it": Case((EXPIRING_SECONDARY,), (0, -1), PROMOTE),
    "no_primary_and_secondary_expired_at_not_after_archives_it_and_generates": Case(
        (EXPIRING_SECONDARY,), (0, 0), (("archive", "S"), ("generate_and_promote", None))
    ),
    "no_primary_and_only_retired_generates_and_archives_the_expired": Case(
        (RETIRED,), (0, 0), (("archive", "R"), ("generate_and_promote", None))
    ),
    "secondary_not_valid_yet_is_archived_one_second_before_not_before": Case(
        (FUTURE_SECONDARY,), (0, -1), (("archive", "S"), ("generate_and_promote", None))
    ),
    "secondary_is_usable_exactly_at_not_before": Case((FUTURE_SECONDARY,), (0, 0), PROMOTE),
    # An expired secondary beside a healthy primary is archived, and replaced when due.
    "expired_secondary_is_archived_and_primary_kept": Case(
        (FRESH_PRIMARY, EXPIRING_SECONDARY), (0, 0), (("archive", "S"),)
    ),
    "expired_secondary_is_archived_and_critical_primary_replaced": Case(
        (PRIMARY, EXPIRING_SECONDARY), (0, 0), (("archive", "S"), ("generate_and_promote", None))
    ),
    # Archived rows are ignored, whatever their dates.
    "archived_rows_are_ignored": Case(
        (
            FRESH_PRIMARY,
            Spec("A1", "archived", created=-800, not_after=-435),
            Spec("A2", "archived", created=-365, not_after=0),
        ),
        (0, 0),
        NOTHING,
    ),
}


def build(case: Case, policy: PolicyConfig) -> tuple[list[Row], dict[str, uuid.UUID], datetime]:
    def at(units: int, seconds: int = 0) -> datetime:
        return ANCHOR + policy.units(units) + timedelta(seconds=seconds)

    rows = [
        new_row(
            s.role,
            created=at(s.created),
            not_after=at(s.not_after),
            not_before=None if s.not_before is None else at(s.not_before),
        )
        for s in case.rows
    ]
    labels = {s.label: r.id for s, r in zip(case.rows, rows, strict=True)}
    return rows, labels, at(*case.now)


def table() -> list[object]:
    return [
        pytest.param(case, policy, id=f"{name}[{unit}]")
        for name, case in CASES.items()
        for unit, policy in (("days", DAYS), ("seconds", SECONDS))
    ]


@pytest.mark.parametrize(("case", "policy"), table())
def test_boundary(case: Case, policy: PolicyConfig) -> None:
    rows, labels, now = build(case, policy)
    # A healthy decryption primary: the signing case must not disturb it.
    rows.append(
        new_row(
            "primary",
            purpose="decryption",
            created=now,
            not_after=now + policy.units(policy.certificate_duration),
        )
    )
    actions = decide(policy, now, rows)
    expected = [(kind, labels[label] if label else None) for kind, label in case.expected]
    assert [(a.kind, a.certificate_id) for a in actions] == expected
    assert all(a.purpose == "signing" for a in actions)
    assert all(a.reason for a in actions)


@pytest.mark.parametrize(("case", "policy"), table())
def test_decide_converges_at_the_same_instant(case: Case, policy: PolicyConfig) -> None:
    rows, _, now = build(case, policy)
    seen: set[tuple[str, str, uuid.UUID | None]] = set()
    for _ in range(4):
        actions = decide(policy, now, rows)
        if not actions:
            break
        for a in actions:
            key = (a.kind, a.purpose, a.certificate_id)
            assert key not in seen, f"{key} repeated"
            seen.add(key)
        rows = apply(policy, now, rows, actions)
    else:
        pytest.fail("decide did not converge within three rounds")
    assert_invariants(policy, now, rows)


# --- applying actions, as the leader would ---------------------------------


def apply(
    policy: PolicyConfig, now: datetime, rows: Sequence[Row], actions: Sequence[Action]
) -> list[Row]:
    result = list(rows)

    def set_role(target: uuid.UUID, role: str) -> None:
        (i,) = [i for i, r in enumerate(result) if r.id == target]
        result[i] = dataclasses.replace(result[i], role=role)

    def retire_primary(purpose: str) -> None:
        for r in result:
            if r.purpose == purpose and r.role == "primary":
                set_role(r.id, "retired")

    def generated(purpose: str, role: str) -> Row:
        not_after = now + policy.units(policy.certificate_duration)
        return new_row(role, purpose=purpose, created=now, not_after=not_after)

    for a in actions:
        if a.kind == "archive":
            assert a.certificate_id is not None
            set_role(a.certificate_id, "archived")
        elif a.kind == "generate":
            assert a.certificate_id is None
            result.append(generated(a.purpose, "secondary"))
        elif a.kind == "promote":
            assert a.certificate_id is not None
            retire_primary(a.purpose)
            set_role(a.certificate_id, "primary")
        else:
            assert a.kind == "generate_and_promote"
            assert a.certificate_id is None
            retire_primary(a.purpose)
            result.append(generated(a.purpose, "primary"))
    return result


def assert_invariants(policy: PolicyConfig, now: datetime, rows: Sequence[Row]) -> None:
    for purpose in ("signing", "decryption"):
        live = [r for r in rows if r.purpose == purpose]
        primaries = [r for r in live if r.role == "primary"]
        secondaries = [r for r in live if r.role == "secondary"]
        assert len(primaries) == 1, f"{purpose} has {len(primaries)} primaries at {now}"
        assert len(secondaries) <= 1, f"{purpose} has {len(secondaries)} secondaries at {now}"


# --- the simulated lifetime ------------------------------------------------


def test_full_lifetime_follows_the_adfs_timeline_second_by_second() -> None:
    start = ANCHOR
    rows = [
        new_row("primary", purpose=p, created=start, not_after=start + SHORT.units(20))
        for p in ("signing", "decryption")
    ]
    names = {r.id: f"{r.purpose}-0" for r in rows}
    made = {"signing": 0, "decryption": 0}
    timeline: list[tuple[int, str, str, str]] = []
    for t in range(51):
        now = start + timedelta(seconds=t)
        actions = decide(SHORT, now, rows)
        before = {r.id for r in rows}
        rows = apply(SHORT, now, rows, actions)
        for r in rows:
            if r.id not in before:
                made[r.purpose] += 1
                names[r.id] = f"{r.purpose}-{made[r.purpose]}"
        for a in actions:
            if a.certificate_id is not None:
                subject = names[a.certificate_id]
            else:
                (new,) = [r for r in rows if r.id not in before and r.purpose == a.purpose]
                subject = names[new.id]
            timeline.append((t, a.purpose, a.kind, subject))
        assert decide(SHORT, now, rows) == [], f"decide did not converge at t={t}"
        assert_invariants(SHORT, now, rows)

    for purpose in ("signing", "decryption"):

        def n(i: int, purpose: str = purpose) -> str:
            return f"{purpose}-{i}"

        assert [(t, kind, c) for t, p, kind, c in timeline if p == purpose] == [
            (12, "generate", n(1)),  # P0 ends at 20: 20 - 8
            (16, "promote", n(1)),  # 12 + 4
            (20, "archive", n(0)),  # P0's NotAfter
            (24, "generate", n(2)),  # P1 ends at 32: 32 - 8
            (28, "promote", n(2)),
            (32, "archive", n(1)),
            (36, "generate", n(3)),
            (40, "promote", n(3)),
            (44, "archive", n(2)),
            (48, "generate", n(4)),
        ]


# --- decide: other behaviour -----------------------------------------------


def test_both_purposes_act_independently_in_one_call() -> None:
    now = ANCHOR
    signing = new_row("primary", created=now - DAYS.units(350), not_after=now + DAYS.units(15))
    decryption = new_row(
        "primary",
        purpose="decryption",
        created=now - DAYS.units(100),
        not_after=now + DAYS.units(1),
    )
    successor = new_row(
        "secondary",
        purpose="decryption",
        created=now - DAYS.units(2),
        not_after=now + DAYS.units(363),
    )
    actions = decide(DAYS, now, [signing, decryption, successor])
    assert [(a.kind, a.purpose, a.certificate_id) for a in actions] == [
        ("generate", "signing", None),
        ("promote", "decryption", successor.id),
    ]


def test_archives_come_before_every_other_action() -> None:
    now = ANCHOR
    rows = [
        new_row("primary", created=now - DAYS.units(345), not_after=now + DAYS.units(20)),
        new_row("retired", created=now - DAYS.units(365), not_after=now),
        new_row("retired", purpose="decryption", created=now - DAYS.units(400), not_after=now),
    ]
    actions = decide(DAYS, now, rows)
    assert [(a.kind, a.purpose) for a in actions] == [
        ("archive", "signing"),
        ("archive", "decryption"),
        ("generate", "signing"),
        ("generate_and_promote", "decryption"),
    ]


def test_reasons_name_the_date_and_the_threshold() -> None:
    not_after = datetime(2027, 11, 1, tzinfo=UTC)
    primary = new_row("primary", created=not_after - DAYS.units(365), not_after=not_after)
    (generate,) = only(decide(DAYS, not_after - DAYS.units(20), [primary]), "signing")
    assert generate.reason == (
        "the primary expires at 2027-11-01T00:00:00+00:00, within generation_threshold (20 days)"
    )
    (urgent,) = only(decide(DAYS, not_after - DAYS.units(1), [primary]), "signing")
    assert urgent.reason == (
        "the primary expires at 2027-11-01T00:00:00+00:00, within critical_threshold (2 days), "
        "and there is no usable secondary"
    )
    (expired,) = only(decide(DAYS, not_after, [primary]), "signing")
    assert expired.reason == (
        "the primary expired at 2027-11-01T00:00:00+00:00 and there is no usable secondary"
    )
    (short,) = only(decide(SECONDS, not_after - SECONDS.units(20), [primary]), "signing")
    assert short.reason.endswith("within generation_threshold (20 × 1 s)")


def test_unusable_secondary_reason_says_why() -> None:
    now = ANCHOR
    expired = new_row("secondary", created=now - DAYS.units(365), not_after=now)
    (archive, _) = only(decide(DAYS, now, [expired]), "signing")
    assert archive.reason == (
        "the secondary expired at 2027-11-01T00:00:00+00:00 before it was promoted"
    )
    early = new_row(
        "secondary",
        created=now,
        not_before=now + timedelta(seconds=1),
        not_after=now + DAYS.units(365),
    )
    (archive, _) = only(decide(DAYS, now, [early]), "signing")
    assert archive.reason == "the secondary is not valid until 2027-11-01T00:00:01+00:00"


def test_expired_primary_is_archived_on_the_call_after_its_replacement() -> None:
    now = ANCHOR
    primary = new_row("primary", created=now - DAYS.units(366), not_after=now - DAYS.units(1))
    rows = [
        primary,
        new_row("primary", purpose="decryption", created=now, not_after=now + DAYS.units(365)),
    ]
    first = decide(DAYS, now, rows)
    assert [a.kind for a in first] == ["generate_and_promote"]
    rows = apply(DAYS, now, rows, first)
    second = decide(DAYS, now, rows)
    assert [(a.kind, a.certificate_id) for a in second] == [("archive", primary.id)]
    assert decide(DAYS, now, apply(DAYS, now, rows, second)) == []


def test_zero_promotion_threshold_promotes_on_the_next_call() -> None:
    policy = dataclasses.replace(SECONDS, promotion_threshold=0)
    now = ANCHOR
    rows = [
        new_row(
            "primary", purpose=p, created=now - policy.units(345), not_after=now + policy.units(20)
        )
        for p in ("signing", "decryption")
    ]
    first = decide(policy, now, rows)
    assert [a.kind for a in first] == ["generate", "generate"]
    rows = apply(policy, now, rows, first)
    assert [a.kind for a in decide(policy, now, rows)] == ["promote", "promote"]


def test_accepts_the_config_db_row_type() -> None:
    now = ANCHOR
    row = CertificateRow(
        id=uuid.uuid4(),
        purpose="signing",
        role="primary",
        thumbprint="00" * 20,
        sha256="00" * 32,
        subject="CN=contoso Token Signing",
        key_type="rsa-2048",
        not_before=now - DAYS.units(345),
        not_after=now + DAYS.units(20),
        der=b"",
        master_key=uuid.uuid4(),
        blob=b"",
        created_at=now - DAYS.units(345),
        role_since=now - DAYS.units(345),
    )
    assert [a.kind for a in only(decide(DAYS, now, [row]), "signing")] == ["generate"]
    assert next_action(DAYS, now, [row], row.id) == Scheduled("generate_secondary", now)


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        decide(DAYS, datetime(2027, 1, 1), [])


def test_two_primaries_for_one_purpose_are_refused() -> None:
    rows = [
        new_row("primary", created=ANCHOR, not_after=ANCHOR + DAYS.units(365)) for _ in range(2)
    ]
    with pytest.raises(ValueError, match="two primary"):
        decide(DAYS, ANCHOR, rows)


def test_unknown_purpose_is_refused() -> None:
    row = new_row("primary", purpose="encryption", created=ANCHOR, not_after=ANCHOR + DAYS.units(1))
    with pytest.raises(ValueError, match="unknown purpose"):
        decide(DAYS, ANCHOR, [row])


# --- next_action -----------------------------------------------------------


def test_next_action_of_a_primary_is_generating_its_secondary() -> None:
    now = ANCHOR
    p = new_row("primary", created=now - DAYS.units(100), not_after=now + DAYS.units(265))
    assert next_action(DAYS, now, [p], p.id) == Scheduled(
        "generate_secondary", now + DAYS.units(245)
    )


def test_next_action_between_generation_and_critical_is_an_overdue_generate_secondary() -> None:
    now = ANCHOR
    p = new_row("primary", created=now - DAYS.units(355), not_after=now + DAYS.units(10))
    assert next_action(DAYS, now, [p], p.id) == Scheduled(
        "generate_secondary", now - DAYS.units(10)
    )


def test_next_action_of_a_primary_past_critical_is_an_overdue_generate_and_promote() -> None:
    now = ANCHOR
    p = new_row("primary", created=now - DAYS.units(366), not_after=now - DAYS.units(1))
    assert next_action(DAYS, now, [p], p.id) == Scheduled(
        "generate_and_promote", now - DAYS.units(3)
    )


def test_next_action_generate_and_promote_when_generation_and_critical_coincide() -> None:
    policy = dataclasses.replace(DAYS, generation_threshold=2)
    now = ANCHOR
    p = new_row("primary", created=now - DAYS.units(100), not_after=now + DAYS.units(265))
    assert next_action(policy, now, [p], p.id) == Scheduled(
        "generate_and_promote", now + DAYS.units(263)
    )


@pytest.mark.parametrize(
    ("created", "expected"),
    [
        pytest.param(-20, -15, id="promotion_threshold_after_generation"),
        pytest.param(-3, -2, id="critical_threshold_before_not_after_when_earlier"),
    ],
)
def test_next_action_of_primary_and_secondary_is_the_promotion_moment(
    created: int, expected: int
) -> None:
    not_after = ANCHOR
    now = not_after - DAYS.units(3)
    p = new_row("primary", created=not_after - DAYS.units(365), not_after=not_after)
    s = new_row(
        "secondary",
        created=not_after + DAYS.units(created),
        not_after=not_after + DAYS.units(created + 365),
    )
    at = not_after + DAYS.units(expected)
    assert next_action(DAYS, now, [p, s], p.id) == Scheduled("retire", at)
    assert next_action(DAYS, now, [p, s], s.id) == Scheduled("promote", at)


def test_next_action_of_secondary_without_primary_is_promotion_now() -> None:
    s = new_row("secondary", created=ANCHOR - DAYS.units(1), not_after=ANCHOR + DAYS.units(364))
    assert next_action(DAYS, ANCHOR, [s], s.id) == Scheduled("promote", ANCHOR)


def test_next_action_of_unusable_secondary_is_archiving_now() -> None:
    p = new_row("primary", created=ANCHOR - DAYS.units(1), not_after=ANCHOR + DAYS.units(364))
    s = new_row("secondary", created=ANCHOR - DAYS.units(365), not_after=ANCHOR)
    assert next_action(DAYS, ANCHOR, [p, s], s.id) == Scheduled("archive", ANCHOR)
    # ... and the primary then counts as having no secondary.
    assert next_action(DAYS, ANCHOR, [p, s], p.id) == Scheduled(
        "generate_secondary", ANCHOR + DAYS.units(344)
    )


def test_next_action_of_retired_is_archiving_at_not_after() -> None:
    r = new_row("retired", created=ANCHOR - DAYS.units(300), not_after=ANCHOR + DAYS.units(65))
    assert next_action(DAYS, ANCHOR, [r], r.id) == Scheduled("archive", ANCHOR + DAYS.units(65))


def test_next_action_of_archived_or_unknown_is_none() -> None:
    a = new_row("archived", created=ANCHOR - DAYS.units(400), not_after=ANCHOR - DAYS.units(35))
    assert next_action(DAYS, ANCHOR, [a], a.id) is None
    assert next_action(DAYS, ANCHOR, [a], uuid.uuid4()) is None


# --- convergence from any state --------------------------------------------


@st.composite
def farm_states(draw: st.DrawFn) -> tuple[PolicyConfig, list[Row]]:
    critical = draw(st.integers(0, 6))
    generation = draw(st.integers(critical, 12))
    policy = dataclasses.replace(
        SHORT,
        critical_threshold=critical,
        generation_threshold=generation,
        promotion_threshold=draw(st.integers(0, 10)),
    )
    offset = st.integers(-25, 25)
    rows: list[Row] = []
    for purpose in ("signing", "decryption"):
        roles = ["retired"] * draw(st.integers(0, 2)) + ["archived"] * draw(st.integers(0, 1))
        roles += [role for role in ("primary", "secondary") if draw(st.booleans())]
        for role in roles:
            created = ANCHOR + timedelta(seconds=draw(offset))
            not_before = created + timedelta(seconds=draw(st.integers(-2, 2)))
            not_after = not_before + timedelta(seconds=draw(st.integers(1, 30)))
            rows.append(Row(uuid.uuid4(), purpose, role, not_before, not_after, created_at=created))
    return policy, rows


@settings(max_examples=300, deadline=None)
@given(farm_states())
def test_decide_settles_from_any_state_without_repeating_itself(
    state: tuple[PolicyConfig, list[Row]],
) -> None:
    policy, rows = state
    now = ANCHOR
    done: set[tuple[str, str, uuid.UUID | None]] = set()
    for _ in range(3):
        actions = decide(policy, now, rows)
        if not actions:
            break
        for a in actions:
            key = (a.kind, a.purpose, a.certificate_id)
            assert key not in done, f"{key} repeated"
            done.add(key)
        rows = apply(policy, now, rows, actions)
    assert decide(policy, now, rows) == []
    assert_invariants(policy, now, rows)
    for r in rows:
        if r.role == "primary":
            assert now < r.not_after - policy.units(policy.critical_threshold)
        elif r.role == "secondary":
            assert r.not_before <= now < r.not_after
        elif r.role == "retired":
            assert now < r.not_after


# --- require_fetch: promotion waits for the relying parties ---------------------


def fetch_case(purpose: str = "signing") -> tuple[Row, Row]:
    """A primary with a year to go and a secondary generated at ANCHOR."""
    primary = new_row(
        "primary",
        created=ANCHOR - timedelta(days=300),
        not_after=ANCHOR + timedelta(days=18),
        purpose=purpose,
    )
    secondary = new_row(
        "secondary", created=ANCHOR, not_after=ANCHOR + timedelta(days=365), purpose=purpose
    )
    return primary, secondary


WAITING = dataclasses.replace(DAYS, require_fetch=True)


def test_require_fetch_holds_a_due_promotion_while_a_relying_party_has_not_fetched() -> None:
    primary, secondary = fetch_case()
    due = ANCHOR + timedelta(days=5)
    unfetched = {secondary.id: ("rp2",)}
    assert only(decide(WAITING, due, [primary, secondary], unfetched=unfetched), "signing") == []
    # Without require_fetch the same rows promote, fetched or not (AD FS).
    (promote,) = only(decide(DAYS, due, [primary, secondary], unfetched=unfetched), "signing")
    assert (promote.kind, promote.certificate_id) == ("promote", secondary.id)
    # Once every relying party fetched it, the promotion happens.
    (promote,) = only(decide(WAITING, due, [primary, secondary], unfetched={}), "signing")
    assert promote.kind == "promote"


def test_require_fetch_gives_way_at_the_critical_threshold_to_the_second() -> None:
    primary, secondary = fetch_case()
    critical = primary.not_after - timedelta(days=2)
    unfetched = {secondary.id: ("rp1", "rp2")}
    rows = [primary, secondary]
    assert (
        only(decide(WAITING, critical - timedelta(seconds=1), rows, unfetched=unfetched), "signing")
        == []
    )
    (promote,) = only(decide(WAITING, critical, rows, unfetched=unfetched), "signing")
    assert promote.kind == "promote"
    assert promote.reason.endswith("(not yet fetched by rp1, rp2)")


def test_require_fetch_moves_the_scheduled_promotion_to_the_critical_moment() -> None:
    primary, secondary = fetch_case()
    rows = [primary, secondary]
    critical = primary.not_after - timedelta(days=2)
    waiting = {secondary.id: ("rp1",)}
    assert next_action(WAITING, ANCHOR, rows, secondary.id, unfetched=waiting) == Scheduled(
        "promote", critical
    )
    assert next_action(WAITING, ANCHOR, rows, primary.id, unfetched=waiting) == Scheduled(
        "retire", critical
    )
    assert next_action(WAITING, ANCHOR, rows, secondary.id, unfetched={}) == Scheduled(
        "promote", ANCHOR + timedelta(days=5)
    )


def test_require_fetch_never_holds_a_decryption_secondary() -> None:
    primary, secondary = fetch_case("decryption")
    (promote,) = only(
        decide(
            WAITING,
            ANCHOR + timedelta(days=5),
            [primary, secondary],
            unfetched={secondary.id: ("rp1",)},
        ),
        "decryption",
    )
    assert promote.kind == "promote"


def test_unfetched_by_names_who_has_not_fetched_each_signing_secondary() -> None:
    from farmkeys.policy import unfetched_by

    @dataclass(frozen=True)
    class Published:
        id: uuid.UUID
        purpose: str
        role: str
        thumbprint: str

    secondary = Published(uuid.uuid4(), "signing", "secondary", "B" * 40)
    rows = [
        Published(uuid.uuid4(), "signing", "primary", "A" * 40),
        secondary,
        Published(uuid.uuid4(), "decryption", "secondary", "C" * 40),
    ]
    fetched = {("rp1", "A" * 40), ("rp1", "B" * 40), ("rp2", "A" * 40), ("rp3", "C" * 40)}
    assert unfetched_by(["rp1", "rp2", "rp3"], fetched, rows) == {secondary.id: ("rp2", "rp3")}
    assert unfetched_by(["rp1"], fetched, rows) == {}


# --- a revert's hold, and whether a promotion may be reverted (issue 23) ---------------------


def reverted_case() -> tuple[Row, Row]:
    """After a revert at ANCHOR: the old primary P (retired by a promotion 1 day before, so
    it expires 14 days on) is primary again; the one that replaced it, S (made 6 days
    before, past its 5-day promotion time), is the secondary again."""
    primary = new_row(
        "primary", created=ANCHOR - timedelta(days=351), not_after=ANCHOR + timedelta(days=14)
    )
    secondary = new_row(
        "secondary", created=ANCHOR - timedelta(days=6), not_after=ANCHOR + timedelta(days=359)
    )
    return primary, secondary


def test_a_held_secondary_is_not_promoted_at_its_promotion_time() -> None:
    primary, secondary = reverted_case()
    rows = [primary, secondary]
    # Without the hold it is overdue: promoted at once.
    (promote,) = only(decide(DAYS, ANCHOR, rows), "signing")
    assert (promote.kind, promote.certificate_id) == ("promote", secondary.id)
    # Held: nothing, at any time before the primary's critical threshold.
    critical = primary.not_after - timedelta(days=2)
    for now in (ANCHOR, ANCHOR + timedelta(days=5), critical - timedelta(seconds=1)):
        assert only(decide(DAYS, now, rows, held={secondary.id}), "signing") == []


def test_the_critical_threshold_of_the_primary_releases_a_held_promotion_to_the_second() -> None:
    primary, secondary = reverted_case()
    rows = [primary, secondary]
    critical = primary.not_after - timedelta(days=2)
    assert (
        only(decide(DAYS, critical - timedelta(seconds=1), rows, held={secondary.id}), "signing")
        == []
    )
    (promote,) = only(decide(DAYS, critical, rows, held={secondary.id}), "signing")
    assert (promote.kind, promote.certificate_id) == ("promote", secondary.id)
    assert promote.reason.endswith("(its promotion was held by a revert)")


def test_a_released_hold_promotes_on_the_normal_schedule() -> None:
    # A plain `rollover` takes the secondary out of the record's holds: the policy then
    # promotes it as ever (overdue here, so at once).
    primary, secondary = reverted_case()
    (promote,) = only(decide(DAYS, ANCHOR, [primary, secondary], held=set()), "signing")
    assert promote.kind == "promote"


def test_a_hold_on_one_purpose_leaves_the_other_alone() -> None:
    primary, secondary = reverted_case()
    other_primary = dataclasses.replace(primary, id=uuid.uuid4(), purpose="decryption")
    other_secondary = dataclasses.replace(secondary, id=uuid.uuid4(), purpose="decryption")
    rows = [primary, secondary, other_primary, other_secondary]
    actions = decide(DAYS, ANCHOR, rows, held={secondary.id})
    assert [(a.kind, a.purpose) for a in actions] == [("promote", "decryption")]


def test_status_schedules_a_held_promotion_at_the_critical_threshold() -> None:
    primary, secondary = reverted_case()
    rows = [primary, secondary]
    critical = primary.not_after - timedelta(days=2)
    held = {secondary.id}
    assert next_action(DAYS, ANCHOR, rows, secondary.id, held=held) == Scheduled(
        "promote", critical
    )
    assert next_action(DAYS, ANCHOR, rows, primary.id, held=held) == Scheduled("retire", critical)
    assert next_action(DAYS, ANCHOR, rows, secondary.id) == Scheduled(
        "promote", secondary.created_at + timedelta(days=5)
    )


@dataclass(frozen=True)
class Certified(Row):
    thumbprint: str = ""


@dataclass(frozen=True)
class Promoted:
    at: int
    primary: uuid.UUID
    previous: uuid.UUID | None
    urgent: bool = False


def promoted_case() -> tuple[Certified, Certified, Promoted]:
    """A promotion one day before ANCHOR: N (made 6 days before) replaced R, which is
    retired and expires 14 days after ANCHOR."""
    retired = Certified(
        uuid.uuid4(),
        "signing",
        "retired",
        ANCHOR - timedelta(days=351),
        ANCHOR + timedelta(days=14),
        ANCHOR - timedelta(days=351),
        "R" * 40,
    )
    new = Certified(
        uuid.uuid4(),
        "signing",
        "primary",
        ANCHOR - timedelta(days=6),
        ANCHOR + timedelta(days=359),
        ANCHOR - timedelta(days=6),
        "N" * 40,
    )
    at = int((ANCHOR - timedelta(days=1)).timestamp())
    return retired, new, Promoted(at, new.id, retired.id)


def test_revert_makes_the_retired_certificate_primary_and_the_primary_secondary() -> None:
    from farmkeys.policy import revert

    retired, new, promotion = promoted_case()
    plan = revert(DAYS, ANCHOR, [retired, new], "signing", promotion=promotion, revoked=())
    assert (plan.primary, plan.secondary) == (retired, new)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("no promotion", "records no promotion to revert"),
        ("reverted", "already reverted"),
        ("urgent", "urgent rollover"),
        ("revoked", "urgent rollover"),
        ("archived", "is archived"),
        ("expired", "expired at"),
        ("critical", "within critical_threshold"),
        ("secondary", "there is a secondary"),
        ("nothing replaced", "replaced no primary"),
        ("another primary", "not the certificate the last promotion made"),
    ],
)
def test_revert_is_refused_with_why(change: str, why: str) -> None:
    from farmkeys.errors import RevertRefusedError
    from farmkeys.policy import revert

    retired, new, promotion = promoted_case()
    rows: list[Certified] = [retired, new]
    recorded: Promoted | None = promotion
    revoked: tuple[str, ...] = ()
    now = ANCHOR
    held_since = None
    if change == "no promotion":
        recorded = None
    elif change == "reverted":
        recorded, held_since = None, promotion.at + 60
    elif change == "urgent":
        recorded = dataclasses.replace(promotion, urgent=True)
    elif change == "revoked":
        revoked = (retired.thumbprint,)
    elif change == "archived":
        rows = [new]
    elif change == "expired":
        now = retired.not_after
    elif change == "critical":
        now = retired.not_after - timedelta(days=2)
    elif change == "secondary":
        rows.append(
            dataclasses.replace(new, id=uuid.uuid4(), role="secondary", thumbprint="S" * 40)
        )
    elif change == "nothing replaced":
        recorded = dataclasses.replace(promotion, previous=None)
    elif change == "another primary":
        recorded = dataclasses.replace(promotion, primary=uuid.uuid4())
    with pytest.raises(RevertRefusedError, match=why) as caught:
        revert(
            DAYS,
            now,
            rows,
            "signing",
            promotion=recorded,
            revoked=revoked,
            held_since=held_since,
        )
    assert "\n" not in caught.value.diagnostics()
    assert caught.value.what.startswith("signing: ")


def test_revert_is_allowed_to_the_second_before_the_critical_threshold() -> None:
    from farmkeys.policy import revert

    retired, new, promotion = promoted_case()
    just_before = retired.not_after - timedelta(days=2, seconds=1)
    plan = revert(DAYS, just_before, [retired, new], "signing", promotion=promotion, revoked=())
    assert plan.primary == retired
