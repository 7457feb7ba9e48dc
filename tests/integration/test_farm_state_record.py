"""The farm state record against a config-DB writer who has no master key (issue 9, part 1).

Real PostgreSQL and slapd: every attack is made with SQL on the farm's own
database, then a node syncs, the leader is asked to act, and `status` looks.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from farmtools import (
    TestFarm,
    audit_events,
    db_query,
    expect_ok,
    one_error_line,
    seal_state,
    snapshot,
)

from farmkeys.formats import farm_state
from farmkeys.leader import sealing
from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.slapd import LocalSlapd


@pytest.fixture
def two_node_farm(initialised_farm: TestFarm) -> TestFarm:
    """The initialised farm once node-a and node-b have synced."""
    for node in ("node-a", "node-b"):
        expect_ok(initialised_farm.run("sync", node=node))
    return initialised_farm


def sql(farm: TestFarm, *statements: str) -> None:
    with psycopg.connect(farm.dsn) as conn:
        for statement in statements:
            conn.execute(statement)


def live(farm: TestFarm) -> dict[str, tuple[str, str]]:
    rows = db_query(farm.dsn, "SELECT thumbprint, purpose, role FROM certificate")
    return {r["thumbprint"]: (r["purpose"], r["role"]) for r in rows}


def state_version(farm: TestFarm) -> int:
    return int(db_query(farm.dsn, "SELECT version FROM farm_state")[0]["version"])


def manifest(farm: TestFarm, node: str = "node-a") -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((farm.store(node) / "current" / "manifest.json").read_text())
    return doc


def refused(farm: TestFarm, node: str, *fragments: str) -> None:
    """A sync on ``node`` fails in one line naming the farm state, and changes no file."""
    before = snapshot(farm.store(node))
    result = farm.run("sync", node=node)
    assert result.code == 1
    line = one_error_line(result)
    for fragment in fragments:
        assert fragment in line, line
    assert "farmkeys repair-state" in line
    assert snapshot(farm.store(node)) == before


def critical(farm: TestFarm, fragment: str, *, authentic: bool = False) -> None:
    """`status` is critical, naming the problem and `repair-state`; ``authentic``: whether
    the record itself verifies and matches the rows (an old genuine one does)."""
    result = farm.run("status", "--json")
    assert result.code == 2, result.out
    assert any(fragment in p and "repair-state" in p for p in result.json["problems"]), result.out
    assert result.json["farm_state"]["authentic"] is authentic


# -- what the record holds -------------------------------------------------------------


def test_init_writes_version_1_and_every_node_records_it(two_node_farm: TestFarm) -> None:
    rows = db_query(two_node_farm.dsn, "SELECT version, body, mac, term FROM farm_state")
    assert len(rows) == 1 and rows[0]["version"] == 1 and rows[0]["term"] is None
    state = farm_state.parse(bytes(rows[0]["body"]))
    assert {e.thumbprint for e in state.live} == set(live(two_node_farm))
    assert manifest(two_node_farm)["state_version"] == 1
    status = two_node_farm.run("status", "--json").json
    assert status["farm_state"] == {
        "version": 1,
        "master_key": str(state.master_key),
        "authentic": True,
        "promotion_held": [],
    }
    assert {n["state_version"] for n in status["nodes"]} == {1}


def test_each_leader_change_writes_the_next_version(two_node_farm: TestFarm) -> None:
    expect_ok(two_node_farm.run("rollover", "--purpose", "signing"))
    assert state_version(two_node_farm) == 2
    state = farm_state.parse(
        bytes(db_query(two_node_farm.dsn, "SELECT body FROM farm_state")[0]["body"])
    )
    assert sorted(e.role for e in state.live if e.purpose == "signing") == [
        "primary",
        "secondary",
    ]
    expect_ok(two_node_farm.run("sync"))
    assert manifest(two_node_farm)["state_version"] == 2
    # Asking again changes no certificate (a secondary exists): the next version has the
    # same live set and notes only that the request was answered, so a copy is refused.
    expect_ok(two_node_farm.run("rollover", "--purpose", "signing"))
    assert state_version(two_node_farm) == 3
    again = farm_state.parse(
        bytes(db_query(two_node_farm.dsn, "SELECT body FROM farm_state")[0]["body"])
    )
    assert again.live == state.live
    assert len(again.answered) == 2


def test_a_master_key_roll_authenticates_the_state_under_the_new_key(
    two_node_farm: TestFarm,
) -> None:
    before = farm_state.parse(
        bytes(db_query(two_node_farm.dsn, "SELECT body FROM farm_state")[0]["body"])
    )
    expect_ok(
        two_node_farm.run("rollover", "--master-key", "--urgent", "--yes")
    )  # the old key deleted
    current = db_query(two_node_farm.dsn, "SELECT id FROM master_key WHERE state = 'current'")[0][
        "id"
    ]
    state = farm_state.parse(
        bytes(db_query(two_node_farm.dsn, "SELECT body FROM farm_state")[0]["body"])
    )
    assert state.master_key == current != before.master_key
    assert {e.master_key for e in state.live} == {current}
    assert two_node_farm.run("status", "--json").json["farm_state"]["authentic"] is True
    expect_ok(two_node_farm.run("sync"))
    assert manifest(two_node_farm)["state_version"] == state.version


def test_no_file_of_an_urgently_replaced_key_stays_in_a_nodes_store(
    two_node_farm: TestFarm,
) -> None:
    old = next(t for t, (p, r) in live(two_node_farm).items() if p == "signing" and r == "primary")
    key = (two_node_farm.store() / "signing" / f"{old}.key").read_bytes()
    expect_ok(two_node_farm.run("rollover", "--purpose", "signing"))
    expect_ok(two_node_farm.run("sync"))  # a second generation that still holds it
    expect_ok(two_node_farm.run("rollover", "--purpose", "signing", "--urgent", "--yes"))
    expect_ok(two_node_farm.run("sync"))
    for path in two_node_farm.store().rglob("*"):
        assert old not in path.name
        assert path.is_dir() or path.is_symlink() or key not in path.read_bytes()


# -- the attacks -----------------------------------------------------------------------


def test_two_updates_after_an_urgent_rollover_cannot_bring_the_old_primary_back(
    two_node_farm: TestFarm,
) -> None:
    old = next(t for t, (p, r) in live(two_node_farm).items() if p == "signing" and r == "primary")
    result = two_node_farm.run("rollover", "--purpose", "signing", "--urgent", "--yes")
    expect_ok(result)
    expect_ok(two_node_farm.run("sync"))
    assert old in manifest(two_node_farm)["forgotten"]
    new = next(t for t, (p, r) in live(two_node_farm).items() if p == "signing" and r == "primary")

    # The attack: the compromised certificate is the primary again, the new one archived.
    sql(
        two_node_farm,
        f"UPDATE certificate SET role = 'archived' WHERE thumbprint = '{new}'",
        f"UPDATE certificate SET role = 'primary' WHERE thumbprint = '{old}'",
    )
    refused(two_node_farm, "node-a", "differ from its authenticated farm state", old)
    refused(two_node_farm, "node-b", "differ from its authenticated farm state")
    critical(two_node_farm, "differ from its authenticated farm state")

    # The leader builds nothing on it: a rollover is refused, the DB as it was.
    before = db_query(two_node_farm.dsn, "SELECT id, role, blob FROM certificate ORDER BY id")
    answer = two_node_farm.run("rollover", "--purpose", "decryption")
    assert answer.code == 1, answer.err
    assert "refused: the config DB's certificates differ" in answer.out
    assert (
        db_query(two_node_farm.dsn, "SELECT id, role, blob FROM certificate ORDER BY id") == before
    )

    # repair-state: the urgently replaced certificate is archived again, never authenticated.
    repaired = two_node_farm.run("repair-state", "--yes")
    expect_ok(repaired)
    assert f"{old}: urgently replaced before; archived again" in repaired.out
    assert live(two_node_farm)[old] == ("signing", "archived")
    assert "state_repair" in [e["action"] for e in audit_events(two_node_farm)]
    # The new primary stays archived (the operator's choice to restore it, or roll again):
    # the leader's next check makes a new primary, and the node installs it.
    expect_ok(two_node_farm.run("rollover", "--purpose", "signing"))
    expect_ok(two_node_farm.run("sync"))
    installed = {e["thumbprint"] for e in manifest(two_node_farm)["certificates"]}
    assert old not in installed


def test_a_node_never_installs_an_urgently_replaced_certificate_again(
    two_node_farm: TestFarm,
) -> None:
    old = next(t for t, (p, r) in live(two_node_farm).items() if p == "signing" and r == "primary")
    expect_ok(two_node_farm.run("rollover", "--purpose", "signing", "--urgent", "--yes"))
    expect_ok(two_node_farm.run("sync"))
    new = next(t for t, (p, r) in live(two_node_farm).items() if p == "signing" and r == "primary")
    # Even a record that verifies (here: written with the master key, its revoked list
    # emptied) cannot make this node install it: the node keeps its own list.
    sql(
        two_node_farm,
        f"UPDATE certificate SET role = 'archived' WHERE thumbprint = '{new}'",
        f"UPDATE certificate SET role = 'primary' WHERE thumbprint = '{old}'",
        "UPDATE farm_state SET body = convert_to(regexp_replace(convert_from(body, 'UTF8'),"
        " '\"revoked\":\\[[^]]*\\]', '\"revoked\":[]'), 'UTF8')",
    )
    stored = db_query(two_node_farm.dsn, "SELECT body FROM farm_state")[0]["body"]
    assert farm_state.parse(bytes(stored)).revoked == ()
    seal_state(two_node_farm)  # takes the (emptied) revoked list it finds
    refused(two_node_farm, "node-a", old, "urgently replaced")


def test_a_whole_table_restore_from_an_earlier_dump_is_refused(two_node_farm: TestFarm) -> None:
    sql(
        two_node_farm,
        "CREATE TABLE certificate_dump AS SELECT * FROM certificate",
        "CREATE TABLE farm_state_dump AS SELECT * FROM farm_state",
    )
    expect_ok(two_node_farm.run("rollover", "--purpose", "all"))  # two secondaries: version 2
    expect_ok(two_node_farm.run("sync"))
    assert manifest(two_node_farm)["state_version"] == 2

    sql(
        two_node_farm,
        "DELETE FROM certificate",
        "INSERT INTO certificate SELECT * FROM certificate_dump",
        "DELETE FROM farm_state",
        "INSERT INTO farm_state SELECT * FROM farm_state_dump",
    )
    refused(two_node_farm, "node-a", "version 1, older than version 2 this node installed")
    critical(
        two_node_farm,
        "node node-a installed farm state version 2, newer than the config DB's 1",
        authentic=True,
    )

    # The operator restored it on purpose: repair-state writes a version above every node's.
    repaired = two_node_farm.run("repair-state", "--yes")
    expect_ok(repaired)
    assert "farm state version 3 written" in repaired.out
    expect_ok(two_node_farm.run("sync"))
    assert manifest(two_node_farm)["state_version"] == 3
    assert two_node_farm.run("status", "--json").json["farm_state"]["authentic"] is True


def test_a_deleted_state_record_is_refused(two_node_farm: TestFarm) -> None:
    sql(two_node_farm, "DELETE FROM farm_state")
    refused(two_node_farm, "node-a", "no farm state record, but this node installed version 1")
    critical(two_node_farm, "no farm state record, but nodes installed version 1")
    answer = two_node_farm.run("rollover", "--purpose", "signing")
    assert answer.code == 1 and "refused: the config DB has no farm state record" in answer.out


def test_a_state_record_copied_from_another_farm_is_refused(
    two_node_farm: TestFarm, slapd: LocalSlapd, postgres: LocalPostgres, tmp_path: Path
) -> None:
    other_dsn = postgres.create_database(f"farmkeys_test_{uuid.uuid4().hex[:12]}")
    other = TestFarm(root=tmp_path / "fabrikam", slapd=slapd, dsn=other_dsn, name="fabrikam")
    other.root.mkdir()
    expect_ok(other.run("init"))
    copied = db_query(other_dsn, "SELECT version, body, mac FROM farm_state")[0]
    with psycopg.connect(two_node_farm.dsn) as conn:
        conn.execute(
            "UPDATE farm_state SET version = %s + 10, body = %s, mac = %s",
            (copied["version"], copied["body"], copied["mac"]),
        )
    refused(two_node_farm, "node-a", "belongs to the farm with DKM group")
    critical(two_node_farm, "belongs to the farm with DKM group")


def test_a_forged_mac_or_body_is_refused(two_node_farm: TestFarm) -> None:
    sql(two_node_farm, "UPDATE farm_state SET mac = decode(repeat('00', 32), 'hex')")
    refused(two_node_farm, "node-c", "fails authentication")  # a new node too: no store yet
    assert not two_node_farm.store("node-c").exists() or not any(
        two_node_farm.store("node-c").iterdir()
    )
    critical(two_node_farm, "fails authentication")


def test_a_role_change_without_touching_the_record_is_refused(two_node_farm: TestFarm) -> None:
    sql(two_node_farm, "UPDATE certificate SET role = 'archived' WHERE purpose = 'decryption'")
    refused(two_node_farm, "node-a", "decryption primary", "is in the farm state but not live")


# -- the leader's side -----------------------------------------------------------------


def test_a_farm_from_before_state_records_is_adopted_by_the_leader(two_node_farm: TestFarm) -> None:
    sql(two_node_farm, "DELETE FROM farm_state", "UPDATE node SET state_version = NULL")
    for node in ("node-a", "node-b"):
        path = two_node_farm.store(node) / "current" / "manifest.json"
        doc = json.loads(path.read_text())
        doc.pop("state_version", None)
        doc.pop("state_digest", None)
        path.write_text(json.dumps(doc))
    expect_ok(two_node_farm.run("sync", node="node-c"))  # with a warning in its log
    status = two_node_farm.run("status", "--json").json
    assert any("no farm state record yet" in p for p in status["problems"])
    # The leader's next check writes the first record, audited as an adoption.
    expect_ok(two_node_farm.run("rollover", "--purpose", "signing"))
    assert "state_adopt" in [e["action"] for e in audit_events(two_node_farm)]
    expect_ok(two_node_farm.run("sync"))
    assert manifest(two_node_farm)["state_version"] == state_version(two_node_farm)


def test_a_record_deleted_with_every_nodes_version_cannot_be_adopted_over_a_node(
    two_node_farm: TestFarm,
) -> None:
    """The writer wipes the record and the node table's versions and moves a role; the
    leader, seeing a farm from before records, adopts the rows; a node that installed
    version 1 refuses the new version 1, whose bytes are not the ones it installed."""
    sql(
        two_node_farm,
        "DELETE FROM farm_state",
        "UPDATE node SET state_version = NULL",
        "UPDATE certificate SET role = 'archived' WHERE purpose = 'decryption'",
    )
    expect_ok(two_node_farm.run("rollover", "--purpose", "signing"))  # the leader adopts
    assert "state_adopt" in [e["action"] for e in audit_events(two_node_farm)]
    refused(two_node_farm, "node-a", "version 1 is not the version 1 this node installed")


def test_keys_are_generated_before_the_fenced_transaction_opens(
    two_node_farm: TestFarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a key is made, another connection can lock the lease row at once."""
    seen: list[str] = []
    real = sealing.generate_certificate

    def watched(*args: Any, **kwargs: Any) -> Any:
        with psycopg.connect(two_node_farm.dsn) as conn:
            try:
                conn.execute("SELECT 1 FROM leader_lease FOR UPDATE NOWAIT")
                seen.append("free")
            except psycopg.errors.LockNotAvailable:
                seen.append("locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(sealing, "generate_certificate", watched)
    expect_ok(two_node_farm.run("rollover", "--purpose", "all"))
    expect_ok(two_node_farm.run("rollover", "--purpose", "signing", "--urgent", "--yes"))
    assert seen and set(seen) == {"free"}, seen


def test_init_on_a_farm_without_a_primary_writes_through_the_fence(two_node_farm: TestFarm) -> None:
    sql(two_node_farm, "UPDATE certificate SET role = 'archived' WHERE purpose = 'signing'")
    seal_state(two_node_farm)  # as a leader would have: the farm state agrees
    result = two_node_farm.run("init")
    expect_ok(result)
    made = [e for e in audit_events(two_node_farm) if e["action"] == "generate_and_promote"]
    assert made[-1]["purpose"] == "signing"
    assert made[-1]["term"] is not None  # under a lease term, not init's unfenced NULL
    expect_ok(two_node_farm.run("sync"))
