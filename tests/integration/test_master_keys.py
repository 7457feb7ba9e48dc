"""The master key's life: rollover, re-sealing, retention and shredding, against real servers.

The rules are pure (:func:`farmkeys.policy.decide_master_keys`), tested without
servers in tests/unit/test_master_key_policy.py; here, the leader's fenced steps
against the real config DB and slapd: a scheduled roll, an operator's roll, an
urgent one, deletion after ``retain``, a leader killed with SIGKILL after each
step, a stale leader, and a directory that is down when the roll is due. "Time" is
moved by editing the recorded times in the database, never by sleeping.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import ldap3
import psycopg
import pytest
from farmtools import (
    TestFarm,
    add_certificate,
    audit_events,
    db_query,
    expect_ok,
    one_error_line,
    run_python,
    seal_state,
)

from farmkeys.config import Config, LeaseConfig, load
from farmkeys.db import ConfigDB
from farmkeys.directory import Directory
from farmkeys.election import Election
from farmkeys.errors import LeaseLostError, MasterKeyMissingError
from farmkeys.formats import farm_state
from farmkeys.leader import Leader
from farmkeys.sync import open_blob
from farmkeys_lab.slapd import LocalSlapd

LEASE = LeaseConfig(ttl_seconds=30, renew_seconds=10)


# -- against the real config DB and slapd ----------------------------------------------------


@pytest.fixture
def config(initialised_farm: TestFarm) -> Config:
    return load(initialised_farm.config())


@pytest.fixture
def db(config: Config) -> Iterator[ConfigDB]:
    with ConfigDB(config.database, config.retry) as db:
        yield db


@pytest.fixture
def leader(config: Config, db: ConfigDB) -> Iterator[Leader]:
    """node-a leading, with a directory connection of its own."""
    election = Election(db, node_id="node-a", lease=LEASE)
    assert election.try_acquire()
    with Directory(config.directory, config.retry) as directory:
        yield Leader(config, db, directory, election)


def group_of(farm: TestFarm) -> uuid.UUID:
    return uuid.UUID(str(db_query(farm.dsn, "SELECT dkm_group FROM farm")[0]["dkm_group"]))


def directory_keys(config: Config, group: uuid.UUID) -> dict[uuid.UUID, bool]:
    """The keys the directory holds now, each with whether CryptoPolicy names it."""
    with Directory(config.directory, config.retry) as fresh:
        return {k.id: k.current for k in fresh.list_keys(group)}


def recorded(farm: TestFarm) -> dict[uuid.UUID, str]:
    rows = db_query(farm.dsn, "SELECT id, state FROM master_key")
    return {r["id"]: r["state"] for r in rows}


def current_key(farm: TestFarm) -> uuid.UUID:
    [row] = db_query(farm.dsn, "SELECT id FROM master_key WHERE state = 'current'")
    return uuid.UUID(str(row["id"]))


def live_keys(farm: TestFarm) -> set[uuid.UUID]:
    rows = db_query(farm.dsn, "SELECT master_key FROM certificate WHERE role <> 'archived'")
    return {r["master_key"] for r in rows}


def certificates(farm: TestFarm) -> set[tuple[str, str, str, bytes]]:
    """What a re-seal must never change: every certificate's role, thumbprint and DER."""
    rows = db_query(farm.dsn, "SELECT purpose, role, thumbprint, der FROM certificate")
    return {(r["purpose"], r["role"], r["thumbprint"], bytes(r["der"])) for r in rows}


def age_current_key(farm: TestFarm, days: int) -> None:
    """The database's record says the current key was made ``days`` ago."""
    with psycopg.connect(farm.dsn) as conn:
        conn.execute(
            "UPDATE master_key SET created_at = now() - make_interval(days => %s)"
            " WHERE state = 'current'",
            (days,),
        )


def age_replaced_key(farm: TestFarm, config: Config, key: uuid.UUID, days: int) -> None:
    """Time passes for a replaced key: the ``master_key`` table and the authenticated farm
    state record (re-sealed as the leader would, with the key it names) both say it was
    replaced ``days`` ago."""
    from dataclasses import replace

    from farmkeys.formats import farm_state

    with psycopg.connect(farm.dsn) as conn:
        conn.execute(
            "UPDATE master_key SET unused_since = now() - make_interval(days => %s),"
            " replaced_at = now() - make_interval(days => %s) WHERE id = %s",
            (days, days, key),
        )
        body = bytes(conn.execute("SELECT body FROM farm_state").fetchone()[0])  # type: ignore[index]
        state = farm_state.parse(body)
        entry = state.replaced_key(key)
        assert entry is not None
        aged = replace(entry, at=entry.at - days * 86400)
        state = replace(state, replaced=tuple(aged if r.key == key else r for r in state.replaced))
        with Directory(config.directory, config.retry) as dirx:
            sealed, mac = farm_state.seal(state, dirx.master_key(group_of(farm), state.master_key))
        conn.execute("UPDATE farm_state SET body = %s, mac = %s", (sealed, mac))


def assert_consistent(farm: TestFarm, config: Config) -> None:
    """The two invariants of every instant: no live blob names a key the directory lacks,
    and the directory holds no key the farm does not record."""
    group = group_of(farm)
    held = set(directory_keys(config, group))
    assert live_keys(farm) <= held, (live_keys(farm), held)
    known = {k for k, state in recorded(farm).items() if state != "deleted"}
    assert held <= known, (held, known)


def fresh_node_installs(farm: TestFarm, node: str) -> set[str]:
    """A node that never synced syncs now (a new process, a new directory connection)."""
    result = farm.spawn("sync", node=node)
    expect_ok(result)
    manifest = (farm.store(node) / "manifest.json").read_text()
    return {t for t in _thumbprints(manifest)}


def _thumbprints(manifest: str) -> list[str]:
    import json

    return [c["thumbprint"] for c in json.loads(manifest)["certificates"]]


def test_a_scheduled_roll_reseals_every_live_blob_and_changes_no_certificate(
    initialised_farm: TestFarm, config: Config, leader: Leader
) -> None:
    group = group_of(initialised_farm)
    add_certificate(
        initialised_farm, purpose="signing", role="retired"
    )  # primary, secondary and retired
    add_certificate(initialised_farm, purpose="signing", role="secondary")
    expect_ok(initialised_farm.run("sync"))
    generation = initialised_farm.run("status", "--json").json["nodes"][0]["generation"]
    before, old = certificates(initialised_farm), current_key(initialised_farm)

    assert leader.tick() == []  # not due
    age_current_key(initialised_farm, 365)
    done = leader.tick()

    new = current_key(initialised_farm)
    assert new != old
    assert [(d.action, d.thumbprint) for d in done] == [("roll", str(old))]
    assert certificates(initialised_farm) == before  # no certificate changed
    assert live_keys(initialised_farm) == {new}  # every live blob re-sealed, the retired one too
    assert directory_keys(config, group) == {old: False, new: True}  # CryptoPolicy names it
    assert recorded(initialised_farm) == {old: "previous", new: "current"}
    actions = [
        (e["action"], e["master_key"]) for e in audit_events(initialised_farm) if e["master_key"]
    ]
    assert actions[-2:] == [("master_key_add", new), ("master_key_roll", new)]
    assert_consistent(initialised_farm, config)

    # The node's store does not change: the same generation, but it proves it reads the new key.
    expect_ok(initialised_farm.run("sync"))
    node = initialised_farm.run("status", "--json").json["nodes"][0]
    assert (node["generation"], node["master_keys"]) == (generation, [str(new)])
    assert fresh_node_installs(initialised_farm, "node-b") == {
        r[2] for r in before if r[1] != "archived"
    }
    assert leader.tick() == []  # once


def test_a_replaced_key_is_deleted_after_retain_and_its_archived_blobs_are_shredded(
    initialised_farm: TestFarm, config: Config, leader: Leader, db: ConfigDB
) -> None:
    group = group_of(initialised_farm)
    archived = add_certificate(initialised_farm, purpose="signing", role="archived")
    old = current_key(initialised_farm)
    age_current_key(initialised_farm, 365)
    leader.tick()
    assert old in directory_keys(config, group)  # kept for `retain` (365 by default)
    age_replaced_key(initialised_farm, config, old, 365)  # retain has passed since the roll
    done = leader.tick()

    assert [(d.action, d.thumbprint) for d in done] == [("delete", str(old))]
    assert old not in directory_keys(config, group)
    assert recorded(initialised_farm)[old] == "deleted"
    [event] = [e for e in audit_events(initialised_farm) if e["action"] == "master_key_delete"]
    assert (
        "the 1 archived certificates sealed under it can never be opened again" in event["detail"]
    )
    # The archived certificate can be opened by nobody now, not even the service account.
    row = next(r for r in db.certificates() if r.thumbprint == archived)
    farm_row = db.require_farm()
    with (
        Directory(config.directory, config.retry) as fresh,
        pytest.raises(MasterKeyMissingError, match=str(old)),
    ):
        open_blob(farm_row, row, fresh)
    assert_consistent(initialised_farm, config)
    status = initialised_farm.run("status", "--json").json
    states = {k["id"]: k["state"] for k in status["master_keys"]}
    assert states[str(old)] == "deleted"


def test_a_config_db_writer_cannot_make_the_leader_delete_a_replaced_key_early(
    initialised_farm: TestFarm, config: Config, leader: Leader
) -> None:
    # Deleting a key is irreversible (it shreds the archived blobs sealed under it): the
    # schedule in the master_key table alone, which a DB writer edits, is not enough.
    group = group_of(initialised_farm)
    add_certificate(initialised_farm, purpose="signing", role="archived")
    old = current_key(initialised_farm)
    age_current_key(initialised_farm, 365)
    leader.tick()
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute(
            "UPDATE master_key SET unused_since = now() - interval '10 years',"
            " replaced_at = now() - interval '10 years', delete_now = true WHERE id = %s",
            (old,),
        )
    for step in leader.tick():
        if step.action == "delete":
            assert "not deleted: the authenticated farm state shows it replaced" in step.detail
    assert old in directory_keys(config, group)
    assert recorded(initialised_farm)[old] == "previous"
    assert "master_key_delete" not in [e["action"] for e in audit_events(initialised_farm)]


def test_rollover_master_key_rolls_now_and_answers_the_operator(
    initialised_farm: TestFarm, config: Config
) -> None:
    before, old = certificates(initialised_farm), current_key(initialised_farm)
    result = initialised_farm.run(
        "rollover", "--master-key"
    )  # no node leads: the command leads for it
    expect_ok(result)
    new = current_key(initialised_farm)
    assert f"master key {new} is now current; 2 live blobs are sealed under it" in result.out
    assert f"master key {old} is replaced; it stays in the directory" in result.out
    assert certificates(initialised_farm) == before
    assert directory_keys(config, group_of(initialised_farm)) == {old: False, new: True}
    requests = db_query(
        initialised_farm.dsn, "SELECT master_key, purpose, ok FROM rollover_request"
    )
    assert requests == [{"master_key": True, "purpose": None, "ok": True}]
    assert [
        r["request"]
        for r in db_query(
            initialised_farm.dsn, "SELECT request FROM master_key WHERE id = %s", (new,)
        )
    ] != [None]


def test_an_urgent_master_key_roll_deletes_the_replaced_key_at_once_and_says_what_that_means(
    initialised_farm: TestFarm, config: Config
) -> None:
    archived = add_certificate(initialised_farm, purpose="decryption", role="archived")
    old = current_key(initialised_farm)
    result = initialised_farm.run("rollover", "--master-key", "--urgent", "--yes")
    expect_ok(result)
    new = current_key(initialised_farm)
    assert directory_keys(config, group_of(initialised_farm)) == {new: True}
    assert recorded(initialised_farm) == {old: "deleted", new: "current"}
    out = " ".join(result.out.split())
    assert f"master key {old} is deleted from the directory (replaced urgently)" in out
    assert "the 1 archived certificates sealed under it can never be opened again" in out
    assert "run `farmkeys rollover --urgent`" in out
    assert_consistent(initialised_farm, config)
    assert archived not in fresh_node_installs(
        initialised_farm, "node-b"
    )  # archived: never installed
    status = initialised_farm.run("status", "--json").json
    shredded = [c for c in status["certificates"] if c["thumbprint"] == archived]
    assert shredded[0]["master_key"] == str(old)


def test_master_key_together_with_purpose_is_a_usage_error_that_changes_nothing(
    initialised_farm: TestFarm,
) -> None:
    before = recorded(initialised_farm)
    result = initialised_farm.spawn("rollover", "--master-key", "--purpose", "signing")
    assert result.code == 64
    assert "--master-key" in result.err and "--purpose" in result.err
    assert len([line for line in result.err.splitlines() if "error" in line]) == 1
    assert recorded(initialised_farm) == before
    assert db_query(initialised_farm.dsn, "SELECT count(*) AS n FROM rollover_request")[0]["n"] == 0


def test_status_shows_every_master_key_with_its_state_counts_and_times(
    initialised_farm: TestFarm, config: Config, leader: Leader
) -> None:
    add_certificate(initialised_farm, purpose="signing", role="archived")
    old = current_key(initialised_farm)
    age_current_key(initialised_farm, 365)
    overdue = initialised_farm.run("status", "--json").json
    assert overdue["health"] == "warning"
    assert any(
        f"the current master key {old} is past its lifetime" in p for p in overdue["problems"]
    )
    leader.tick()
    new = current_key(initialised_farm)
    doc = initialised_farm.run("status", "--json").json
    keys = {k["id"]: k for k in doc["master_keys"]}
    assert set(keys) == {str(old), str(new)}
    assert {
        k: keys[str(new)][k]
        for k in ("state", "current", "sealed_live", "sealed_archived", "in_directory", "delete_at")
    } == {
        "state": "current",
        "current": True,
        "sealed_live": 2,
        "sealed_archived": 0,
        "in_directory": True,
        "delete_at": None,
    }
    created = datetime.fromisoformat(keys[str(new)]["created_at"])
    assert datetime.fromisoformat(keys[str(new)]["roll_at"]) == created + timedelta(days=365)
    previous = keys[str(old)]
    assert (previous["state"], previous["current"], previous["sealed_live"]) == (
        "previous",
        False,
        0,
    )
    assert previous["sealed_archived"] == 1  # archived blobs are never re-sealed
    assert previous["roll_at"] is None and previous["delete_at"] is not None
    # The archived certificate's next action is its shredding, at its key's deletion.
    [archived] = [c for c in doc["certificates"] if c["role"] == "archived"]
    assert archived["next_action"] == {"action": "shred", "at": previous["delete_at"]}
    # A live certificate's next action is the next re-seal when that comes first.
    short = initialised_farm.run("status", "--json", master_key={"lifetime": 1}).json
    primary = next(c for c in short["certificates"] if c["role"] == "primary")
    assert primary["next_action"]["action"] == "reseal"


def test_status_warns_of_live_blobs_left_under_a_replaced_key(initialised_farm: TestFarm) -> None:
    old = current_key(initialised_farm)
    with psycopg.connect(
        initialised_farm.dsn
    ) as conn:  # a roll cut short a day ago, never finished
        conn.execute(
            "UPDATE master_key SET state = 'previous', replaced_at = now() - interval '1 day'"
        )
        conn.execute(
            "INSERT INTO master_key (id, state, created_at, current_since)"
            " VALUES (%s, 'current', now(), now())",
            (uuid.uuid4(),),
        )
    doc = initialised_farm.run("status", "--json").json
    assert any(
        f"2 live blobs are still sealed under master key {old}, which is previous" in p
        for p in doc["problems"]
    ), doc["problems"]


def test_status_is_critical_when_a_key_live_blobs_need_is_missing_from_the_directory(
    initialised_farm: TestFarm, config: Config, slapd: LocalSlapd
) -> None:
    old = current_key(initialised_farm)
    with admin(slapd) as conn:
        conn.delete(f"cn={old},cn={group_of(initialised_farm)},{slapd.container}")
    doc = initialised_farm.run("status", "--json").json
    assert doc["health"] == "critical"
    assert any(
        f"master key {old}, which 2 live certificates need, is missing" in p
        for p in doc["problems"]
    )
    [k] = doc["master_keys"]
    assert (k["id"], k["in_directory"]) == (str(old), False)


# -- faults ---------------------------------------------------------------------------------

_CHILD = """
import os, signal, sys
from farmkeys.config import load
from farmkeys.db import ConfigDB
from farmkeys.directory import Directory
from farmkeys.election import Election
from farmkeys.leader import Leader
from farmkeys.requesting import file_request

config = load(sys.argv[1])
stop_at = sys.argv[2]

def on_step(step, key_id):
    print(step, key_id, flush=True)
    if step == stop_at:
        os.kill(os.getpid(), signal.SIGKILL)

with ConfigDB(config.database, config.retry) as db, Directory(config.directory, config.retry) as d:
    # The operator's urgent roll, as `rollover --master-key --urgent` files it: the next
    # leader finishes it urgently because the authenticated request says so.
    file_request(
        config, db, d, kind="master_key", purpose=None, urgent=True, lifetime_seconds=120
    )
    election = Election(db, node_id=config.node.id, lease=config.lease)
    assert election.try_acquire()
    Leader(config, db, d, election, on_step=on_step).answer_requests()
sys.exit(3)
"""


def run_leader_killed_at(farm: TestFarm, step: str) -> uuid.UUID:
    """A leader process rolls the master key (urgently, as the operator's authenticated
    request asks) and is SIGKILLed right after ``step``
    committed; returns the key id the step reported, which proves the step was reached."""
    done = run_python("-c", _CHILD, str(farm.config("node-a")), step)
    assert done.code == -9, (done.code, done.out, done.err)
    last = done.out.split("\n")[-2].split()
    assert last[0] == step, done.out
    return uuid.UUID(last[1])


@pytest.mark.parametrize("step", ["recorded", "added", "resealed", "current", "deleted"])
def test_a_leader_killed_after_each_step_of_a_roll_leaves_a_farm_the_next_leader_finishes(
    initialised_farm: TestFarm, config: Config, db: ConfigDB, step: str
) -> None:
    group = group_of(initialised_farm)
    expect_ok(initialised_farm.run("sync"))
    installed = fresh_node_installs(initialised_farm, "node-b")
    before, old = certificates(initialised_farm), current_key(initialised_farm)

    reported = run_leader_killed_at(initialised_farm, step)

    # The step was reached: its effect is there, and nothing past it.
    held = directory_keys(config, group)
    new = old if step == "deleted" else reported
    if step == "deleted":
        new = current_key(initialised_farm)
        assert reported == old and old not in held and recorded(initialised_farm)[old] == "deleted"
    elif step == "recorded":
        assert recorded(initialised_farm)[new] == "pending" and new not in held
    elif step == "added":
        assert recorded(initialised_farm)[new] == "pending" and held.get(new) is False
        assert live_keys(initialised_farm) == {old}
    elif step == "resealed":
        assert recorded(initialised_farm)[new] == "pending" and live_keys(initialised_farm) == {new}
        assert held[old] is True  # CryptoPolicy still names the old key
    elif step == "current":
        assert recorded(initialised_farm) == {old: "previous", new: "current"} and held[new] is True
        assert old in held  # the urgent delete had not happened yet
    # At this instant: consistent, and a node that never synced gets the same certificates.
    assert_consistent(initialised_farm, config)
    assert certificates(initialised_farm) == before
    assert fresh_node_installs(initialised_farm, f"node-{step}") == installed

    # The next leader (the killed one's lease runs out) finishes the roll.
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute("UPDATE leader_lease SET expires_at = now() - interval '1 second'")
    election = Election(db, node_id="node-c", lease=LEASE)
    assert election.try_acquire()
    with Directory(config.directory, config.retry) as directory:
        Leader(config, db, directory, election).tick()
    assert_consistent(initialised_farm, config)
    states = recorded(initialised_farm)
    assert sorted(states.values()) == ["current", "deleted"], states  # one new key, no more
    assert states[old] == "deleted" and current_key(initialised_farm) == new
    assert directory_keys(config, group) == {new: True}
    assert live_keys(initialised_farm) == {new}
    assert certificates(initialised_farm) == before
    assert fresh_node_installs(initialised_farm, "node-d") == installed


def test_a_pending_roll_marked_urgent_in_the_table_alone_keeps_the_replaced_key(
    initialised_farm: TestFarm, config: Config, db: ConfigDB
) -> None:
    # A DB writer records a pending roll and marks it urgent: the leader finishes it (a
    # roll is never harmful), but deletes the replaced key only as its retention says.
    group = group_of(initialised_farm)
    old = current_key(initialised_farm)
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute(
            "INSERT INTO master_key (id, state, urgent, reason) VALUES (%s, 'pending', true,"
            " 'forged')",
            (uuid.uuid4(),),
        )
    election = Election(db, node_id="node-c", lease=LEASE)
    assert election.try_acquire()
    with Directory(config.directory, config.retry) as directory:
        Leader(config, db, directory, election).tick()
    assert current_key(initialised_farm) != old
    assert recorded(initialised_farm)[old] == "previous"
    assert old in directory_keys(config, group)


def test_a_swapped_current_key_in_the_table_is_not_followed(
    initialised_farm: TestFarm, config: Config, db: ConfigDB, leader: Leader
) -> None:
    group = group_of(initialised_farm)
    old = current_key(initialised_farm)
    leader.roll_master_key(leader_farm(initialised_farm, config), urgent=False, request=None)
    new = current_key(initialised_farm)
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute("UPDATE master_key SET state = 'previous' WHERE id = %s", (new,))
        conn.execute("UPDATE master_key SET state = 'current' WHERE id = %s", (old,))
    leader.tick()
    assert directory_keys(config, group) == {old: False, new: True}  # CryptoPolicy unchanged
    body = db_query(initialised_farm.dsn, "SELECT body FROM farm_state")[0]["body"]
    assert farm_state.parse(bytes(body)).master_key == new
    assert live_keys(initialised_farm) == {new}
    # ...and status names the edit: the table's current key is not the record's.
    doc = initialised_farm.run("status", "--json").json
    assert doc["health"] == "critical"
    [problem] = [p for p in doc["problems"] if "master_key table names" in p]
    assert f"names {old} current" in problem and f"is under {new}" in problem


def test_a_stale_leader_can_neither_start_nor_continue_a_roll(
    initialised_farm: TestFarm, config: Config, db: ConfigDB
) -> None:
    group = group_of(initialised_farm)
    old = current_key(initialised_farm)
    a = Election(db, node_id="node-a", lease=LEASE)
    assert a.try_acquire()
    with Directory(config.directory, config.retry) as directory:
        stale = Leader(config, db, directory, a)
        farm_row = db.require_farm()
        # node-a records a new key, then pauses; its lease runs out and node-b leads.
        with a.fenced(db) as fence:
            pending = uuid.uuid4()
            fence.tx.record_master_key(pending, stage="pending")
        with psycopg.connect(initialised_farm.dsn) as conn:
            conn.execute("UPDATE leader_lease SET expires_at = now() - interval '1 second'")
        b = Election(db, node_id="node-b", lease=LEASE)
        assert b.try_acquire()
        # node-a wakes up and goes on: refused before the directory is touched.
        with pytest.raises(LeaseLostError):
            stale.roll_master_key(farm_row, urgent=True, request=None)
        assert directory_keys(config, group) == {old: True}
        assert recorded(initialised_farm) == {old: "current", pending: "pending"}
        # Nor may it start a roll of its own, make a key current, or delete one.
        with pytest.raises(LeaseLostError):
            stale.check_master_keys(farm=farm_row)
        assert directory_keys(config, group) == {old: True}
        assert live_keys(initialised_farm) == {old}
        # node-b finishes node-a's recorded key: one new key for the one roll.
        with Directory(config.directory, config.retry) as other:
            Leader(config, db, other, b).roll_master_key(farm_row, urgent=False, request=None)
    assert current_key(initialised_farm) == pending
    assert set(recorded(initialised_farm)) == {old, pending}


def test_the_database_allows_one_current_and_one_pending_key_whatever_the_code_does(
    initialised_farm: TestFarm,
) -> None:
    insert = "INSERT INTO master_key (id, state, current_since) VALUES (%s, %s, now())"
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute(insert, (uuid.uuid4(), "pending"))
    for state, index in (
        ("pending", "master_key_one_pending"),
        ("current", "master_key_one_current"),
    ):
        with (
            psycopg.connect(initialised_farm.dsn) as conn,
            pytest.raises(psycopg.errors.UniqueViolation, match=index),
        ):
            conn.execute(insert, (uuid.uuid4(), state))


def test_a_roll_due_while_the_directory_is_down_changes_nothing_and_happens_once_it_is_back(
    initialised_farm: TestFarm, config: Config, leader: Leader, slapd: LocalSlapd
) -> None:
    old = current_key(initialised_farm)
    age_current_key(initialised_farm, 400)
    before = (
        recorded(initialised_farm),
        certificates(initialised_farm),
        live_keys(initialised_farm),
    )
    slapd.stop()
    try:
        assert leader.tick() == []
        assert (
            recorded(initialised_farm),
            certificates(initialised_farm),
            live_keys(initialised_farm),
        ) == before
        doc = initialised_farm.run("status", "--json").json
        assert any(
            f"the current master key {old} is past its lifetime" in p for p in doc["problems"]
        )
    finally:
        slapd.start()
    assert [d.action for d in leader.tick()] == ["roll"]
    assert current_key(initialised_farm) != old and live_keys(initialised_farm) == {
        current_key(initialised_farm)
    }


def test_a_late_cryptopolicy_write_is_corrected_by_the_next_check(
    initialised_farm: TestFarm, config: Config, leader: Leader, slapd: LocalSlapd
) -> None:
    """What a leader that lost its database session mid-step could leave behind: CryptoPolicy
    naming a key the farm's record does not call current."""
    group = group_of(initialised_farm)
    old = current_key(initialised_farm)
    leader.roll_master_key(leader_farm(initialised_farm, config), urgent=False, request=None)
    new = current_key(initialised_farm)
    with admin(slapd) as conn:
        conn.modify(
            f"cn=CryptoPolicy,cn={group},{slapd.container}",
            {"displayName": [(ldap3.MODIFY_REPLACE, [str(old)])]},
        )
    done = leader.tick()
    assert [d.action for d in done] == ["policy"]
    assert directory_keys(config, group) == {old: False, new: True}


def test_a_farm_from_before_master_keys_were_recorded_adopts_the_directorys_keys(
    initialised_farm: TestFarm, config: Config, leader: Leader
) -> None:
    group = group_of(initialised_farm)
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute("DELETE FROM master_key")
    [(only, _)] = directory_keys(config, group).items()
    assert leader.tick() == []
    assert recorded(initialised_farm) == {only: "current"}
    assert any(e["action"] == "master_key_adopt" for e in audit_events(initialised_farm))


def leader_farm(farm: TestFarm, config: Config) -> Any:
    with ConfigDB(config.database, config.retry) as db:
        return db.require_farm()


def admin(slapd: LocalSlapd) -> ldap3.Connection:
    """The directory's admin (rootdn), as a directory administrator would work."""
    return ldap3.Connection(
        ldap3.Server(slapd.url), user=slapd.admin_dn, password=slapd.admin_password, auto_bind=True
    )


def test_a_node_in_sync_syncs_while_the_directory_is_down_after_a_roll_and_confirms_later(
    initialised_farm: TestFarm, config: Config, leader: Leader, slapd: LocalSlapd
) -> None:
    """A re-seal changes no certificate: a node's start-up sync must not fail for want of
    the new key while its store is right; the key stays unconfirmed until it can read it."""
    expect_ok(initialised_farm.run("sync"))
    leader.roll_master_key(leader_farm(initialised_farm, config), urgent=False, request=None)
    new = current_key(initialised_farm)
    slapd.stop()
    try:
        blind = initialised_farm.run("sync")
    finally:
        slapd.start()
    expect_ok(blind)
    assert "already in sync" in blind.out
    assert initialised_farm.run("status", "--json").json["nodes"][0]["master_keys"] == []
    expect_ok(initialised_farm.run("sync"))
    assert initialised_farm.run("status", "--json").json["nodes"][0]["master_keys"] == [str(new)]


def test_a_row_pointed_at_another_master_key_is_refused_and_the_store_kept(
    initialised_farm: TestFarm, config: Config, leader: Leader
) -> None:
    """Someone who can write the config DB (but holds no key) points a row at the other key
    the directory holds: the blob's own header names its key, and the row must agree."""
    old = current_key(initialised_farm)
    leader.roll_master_key(leader_farm(initialised_farm, config), urgent=False, request=None)
    expect_ok(initialised_farm.run("sync"))
    before = (initialised_farm.store() / "manifest.json").read_text()
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute("UPDATE certificate SET master_key = %s WHERE purpose = 'signing'", (old,))
    result = initialised_farm.run("sync")
    assert result.code == 1
    assert "is sealed under master key" in one_error_line(result)  # the farm state's check
    # Behind it, the blob's own header: even with a farm state that names the row's key.
    seal_state(initialised_farm)
    result = initialised_farm.run("sync")
    assert result.code == 1
    assert "names another master key than its row" in one_error_line(result)
    assert (initialised_farm.store() / "manifest.json").read_text() == before


def test_sync_against_a_config_db_from_before_this_schema_says_to_upgrade(
    initialised_farm: TestFarm,
) -> None:
    with psycopg.connect(initialised_farm.dsn) as conn:  # what a schema-2 database lacks
        conn.execute("ALTER TABLE node DROP COLUMN master_keys")
    result = initialised_farm.run("sync")
    assert result.code == 1
    line = one_error_line(result)
    assert "older schema" in line and "farmkeys db upgrade" in line
    assert (
        not initialised_farm.store().exists()
        or not (initialised_farm.store() / "manifest.json").exists()
    )
