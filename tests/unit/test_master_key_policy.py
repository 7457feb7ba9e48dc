"""The master key's rules, pure (:func:`farmkeys.policy.decide_master_keys` and
:func:`farmkeys.policy.master_key_schedule`): when a key is rolled, finished, re-sealed,
marked unused and deleted. The leader's fenced steps against real servers are in
tests/integration/test_master_keys.py."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from farmkeys import policy
from farmkeys.config import MasterKeyConfig, PolicyConfig
from farmkeys.db import MasterKeyRow

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
MASTER = MasterKeyConfig(lifetime=365, retain=30)
POLICY = PolicyConfig()


def key(
    state: str,
    created: datetime = T0,
    *,
    unused_since: datetime | None = None,
    delete_now: bool = False,
) -> MasterKeyRow:
    return MasterKeyRow(
        id=uuid.uuid4(),
        stage=state,
        created_at=created,
        current_since=created if state == "current" else None,
        replaced_at=None,
        unused_since=unused_since,
        delete_now=delete_now,
        deleted_at=T0 if state == "deleted" else None,
        urgent=False,
        request=None,
        reason="",
    )


def kinds(actions: list[policy.KeyAction]) -> list[tuple[str, uuid.UUID]]:
    return [(a.kind, a.key_id) for a in actions]


def test_the_current_key_is_rolled_exactly_at_its_lifetime() -> None:
    current = key("current")
    due = T0 + 365 * DAY
    decide = policy.decide_master_keys
    assert decide(MASTER, POLICY, due - timedelta(seconds=1), [current], {current.id}) == []
    assert kinds(decide(MASTER, POLICY, due, [current], {current.id})) == [("roll", current.id)]
    [when] = policy.master_key_schedule(MASTER, POLICY, T0, [current], {current.id}).values()
    assert (when.roll_at, when.delete_at) == (due, None)


def test_a_pending_key_is_finished_before_anything_else_is_decided() -> None:
    old = key("current", T0 - 400 * DAY)  # overdue as well
    pending = key("pending")
    gone = key("previous", unused_since=T0 - 100 * DAY)  # and overdue for deletion
    actions = policy.decide_master_keys(
        MASTER, POLICY, T0, [old, pending, gone], {old.id, pending.id}
    )
    assert kinds(actions) == [("finish", pending.id)]


def test_a_replaced_key_is_deleted_retain_after_no_live_blob_names_it() -> None:
    current = key("current")
    since = T0 + DAY
    previous = key("previous", T0 - 300 * DAY, unused_since=since)
    keys = [current, previous]
    at = since + 30 * DAY
    before = policy.decide_master_keys(
        MASTER, POLICY, at - timedelta(seconds=1), keys, {current.id}
    )
    assert before == []
    assert kinds(policy.decide_master_keys(MASTER, POLICY, at, keys, {current.id})) == [
        ("delete", previous.id)
    ]
    schedule = policy.master_key_schedule(MASTER, POLICY, T0, keys, {current.id})
    assert schedule[previous.id].delete_at == at


def test_a_key_live_blobs_name_is_never_deleted_but_archived_blobs_hold_nothing_back() -> None:
    current = key("current")
    previous = key("previous", unused_since=T0 - 1000 * DAY)
    keys = [current, previous]
    named = {current.id, previous.id}  # a live blob is still sealed under the previous key
    actions = policy.decide_master_keys(MASTER, POLICY, T0, keys, named)
    assert kinds(actions) == [("reseal", current.id)]
    assert (
        policy.master_key_schedule(MASTER, POLICY, T0, keys, named)[previous.id].delete_at is None
    )
    # Archived blobs are not in ``named``: nothing but the live set keeps a key.
    assert kinds(policy.decide_master_keys(MASTER, POLICY, T0, keys, {current.id})) == [
        ("delete", previous.id)
    ]


def test_an_urgently_replaced_key_is_deleted_at_once_and_an_unmarked_one_is_marked_first() -> None:
    current = key("current")
    urgent = key("previous", unused_since=T0, delete_now=True)
    unmarked = key("previous")
    keys = [current, urgent, unmarked]
    actions = policy.decide_master_keys(MASTER, POLICY, T0, keys, {current.id})
    assert kinds(actions) == [("delete", urgent.id), ("unused", unmarked.id)]
    schedule = policy.master_key_schedule(MASTER, POLICY, T0, keys, {current.id})
    assert schedule[unmarked.id].delete_at == T0 + 30 * DAY  # counted from now until marked


def test_a_farm_without_a_recorded_current_key_decides_nothing() -> None:
    assert policy.decide_master_keys(MASTER, POLICY, T0, [key("previous")], set()) == []


def test_the_master_key_rules_refuse_a_naive_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        policy.decide_master_keys(MASTER, POLICY, datetime(2026, 1, 1), [], set())
