"""`farmkeys rollover --revert`: undoing the last promotion (issue 23, point 4).

Real PostgreSQL and slapd. A promotion is made as in test_publish.py: a secondary is
asked for, its ``created_at`` set six days back (past AD FS's five-day promotion), and a
leader in this process runs the rollover check. The revert is asked for as an operator
does, by the command, which takes the lease itself when no node leads.
"""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg
import pytest
from farmtools import (
    TestFarm,
    db_query,
    expect_ok,
    leader_check,
    lease_row,
    one_error_line,
    wait_until,
)
from serving import ServeNodes, manifest_identity

from farmkeys import requesting
from farmkeys.config import load
from farmkeys.db import ConfigDB
from farmkeys.directory import Directory
from farmkeys.errors import FarmStateError
from farmkeys.formats import farm_state


def sql(farm: TestFarm, statement: str, params: Any = None) -> None:
    with psycopg.connect(farm.dsn, autocommit=True) as conn:
        conn.execute(statement, params)


def roles(farm: TestFarm, purpose: str = "signing") -> dict[str, str]:
    rows = db_query(
        farm.dsn, "SELECT thumbprint, role FROM certificate WHERE purpose = %s", (purpose,)
    )
    return {r["thumbprint"]: r["role"] for r in rows}


def holder(farm: TestFarm, role: str, purpose: str = "signing") -> str:
    return next(t for t, r in roles(farm, purpose).items() if r == role)


def record(farm: TestFarm) -> farm_state.FarmState:
    return farm_state.parse(bytes(db_query(farm.dsn, "SELECT body FROM farm_state")[0]["body"]))


def promote(farm: TestFarm) -> tuple[str, str]:
    """A signing promotion by the policy: a secondary made "six days ago" replaces the
    primary, which is retired; (the retired, the new primary)."""
    old = holder(farm, "primary")
    expect_ok(farm.run("rollover", "--purpose", "signing"))
    new = holder(farm, "secondary")
    sql(
        farm,
        "UPDATE certificate SET created_at = now() - interval '6 days' WHERE thumbprint = %s",
        (new,),
    )
    assert "promote signing" in leader_check(farm)
    assert roles(farm) == {old: "retired", new: "primary"}
    return old, new


def file_revert(farm: TestFarm, purpose: str = "signing") -> int:
    """A signed revert request, filed as the command files it, not yet answered (and not
    previewed: the leader alone judges it)."""
    cfg = load(farm.config())
    with ConfigDB(cfg.database, cfg.retry) as db, Directory(cfg.directory, cfg.retry) as dirx:
        return requesting.file_request(
            cfg,
            db,
            dirx,
            kind="revert",
            purpose=purpose,
            urgent=False,
            lifetime_seconds=120,
            reason=None,
        )


def request_row(farm: TestFarm, request: int) -> dict[str, Any]:
    return db_query(farm.dsn, "SELECT * FROM rollover_request WHERE id = %s", (request,))[0]


def answer_pending(farm: TestFarm) -> None:
    """A command that takes the lease answers every pending request first."""
    expect_ok(farm.run("rollover", "--purpose", "decryption"))


def refused(farm: TestFarm, *args: str) -> str:
    """`rollover --revert` fails in one line, exit 1, and no certificate changes role."""
    before = db_query(farm.dsn, "SELECT id, role FROM certificate ORDER BY id")
    result = farm.run("rollover", "--revert", "--yes", *args)
    assert result.code == 1, result.out + result.err
    line = one_error_line(result)
    assert db_query(farm.dsn, "SELECT id, role FROM certificate ORDER BY id") == before
    return line


@pytest.fixture
def promoted(initialised_farm: TestFarm) -> tuple[TestFarm, str, str]:
    """The farm after a signing promotion, node-a synced to it: (farm, retired, primary)."""
    old, new = promote(initialised_farm)
    expect_ok(initialised_farm.run("sync"))
    return initialised_farm, old, new


# -- the revert -------------------------------------------------------------------------------


def test_a_revert_makes_the_retired_certificate_primary_and_the_primary_secondary(
    promoted: tuple[TestFarm, str, str],
) -> None:
    farm, old, new = promoted
    reason = "CHG-77: the SP pinned the old key"
    # Without a terminal it needs --yes, and files nothing without it.
    asked = farm.run("rollover", "--revert")
    assert asked.code == 1 and "needs confirmation" in one_error_line(asked)
    assert f"make the signing certificate {old} primary again" in asked.out
    assert roles(farm) == {old: "retired", new: "primary"}
    filed = db_query(farm.dsn, "SELECT count(*) AS n FROM rollover_request WHERE revert")
    assert filed[0]["n"] == 0
    result = expect_ok(farm.run("rollover", "--revert", "--yes", "--reason", reason))
    # The review names both thumbprints, and so does the leader's answer.
    assert f"make the signing certificate {old} primary again" in result.out
    assert f"make the signing primary {new} secondary again" in result.out
    assert "relying parties that already dropped it reject" in result.out
    assert f"signing: primary {old} (reverted), secondary {new}" in result.out
    assert roles(farm) == {old: "primary", new: "secondary"}
    # Nodes install it.
    expect_ok(farm.run("sync"))
    installed = manifest_identity(farm.store())
    assert installed is not None
    assert {("signing", "primary", old), ("signing", "secondary", new)} <= installed
    # The record: the promotion is spent, the hold is on the demoted primary.
    state = record(farm)
    assert state.format == farm_state.FORMAT
    assert state.promotion("signing") is None
    hold = state.hold("signing")
    assert hold is not None and hold.secondary in {e.id for e in state.live}
    # Audited, with who asked.
    events = db_query(
        farm.dsn,
        "SELECT action, thumbprint, detail, request, account, host, reason FROM audit_event"
        " WHERE action = 'revert' ORDER BY id",
    )
    assert [e["thumbprint"] for e in events] == [old, new]
    assert all(e["reason"] == reason and e["account"] and e["host"] for e in events)
    assert events[0]["request"] is not None
    shown = expect_ok(farm.run("events", "--json")).json
    assert [e["action"] for e in shown].count("revert") == 2


def test_the_policy_holds_the_promotion_until_a_plain_rollover_releases_it(
    promoted: tuple[TestFarm, str, str],
) -> None:
    farm, old, new = promoted
    expect_ok(farm.run("rollover", "--revert", "--yes"))
    # The demoted primary was made six days ago: overdue, yet the check leaves it.
    assert leader_check(farm) == []
    assert roles(farm) == {old: "primary", new: "secondary"}
    expect_ok(farm.run("sync"))
    status = farm.run("status", "--json")
    assert status.code == 1, status.out
    (held,) = [p for p in status.json["problems"] if "promotion held" in p]
    assert held.startswith("signing promotion held since the revert of ")
    assert "until `farmkeys rollover` or the critical threshold at " in held
    (doc,) = status.json["farm_state"]["promotion_held"]
    assert doc["purpose"] == "signing" and doc["until"] is not None
    secondary = next(c for c in status.json["certificates"] if c["thumbprint"] == new)
    assert secondary["next_action"] == {"action": "promote", "at": doc["until"]}
    # A plain rollover releases it, audited; the next check promotes it.
    released = expect_ok(farm.run("rollover", "--purpose", "signing"))
    assert f"signing: promotion of secondary {new} released" in released.out
    assert record(farm).hold("signing") is None
    assert "release" in [e["action"] for e in expect_ok(farm.run("events", "--json")).json]
    assert "promote signing" in leader_check(farm)
    assert roles(farm) == {old: "retired", new: "primary"}
    # That promotion may be reverted again.
    assert record(farm).promotion("signing") is not None


def test_a_second_revert_is_refused_while_the_first_holds(
    promoted: tuple[TestFarm, str, str],
) -> None:
    farm, _, _ = promoted
    expect_ok(farm.run("rollover", "--revert", "--yes"))
    line = refused(farm)
    assert "signing: the last promotion was already reverted at " in line
    assert "`farmkeys rollover` releases it" in line


# -- refusals -------------------------------------------------------------------------------


def test_a_revert_without_a_promotion_is_refused(initialised_farm: TestFarm) -> None:
    line = refused(initialised_farm, "--purpose", "decryption")
    assert "decryption: the farm state records no promotion to revert" in line
    assert "nothing was changed" in line


def test_a_revert_after_an_urgent_rollover_is_refused(
    promoted: tuple[TestFarm, str, str],
) -> None:
    farm, _, new = promoted
    expect_ok(farm.run("rollover", "--purpose", "signing", "--urgent", "--yes"))
    assert new in record(farm).revoked
    urgent = record(farm).promotion("signing")
    assert urgent is not None and urgent.urgent and urgent.primary != urgent.previous
    line = refused(farm)
    assert "replaced by an urgent rollover" in line and "revoked and never comes back" in line
    # Filed past the command's own review, the leader refuses it the same way.
    request = file_revert(farm)
    before = roles(farm)
    answer_pending(farm)
    row = request_row(farm, request)
    assert row["ok"] is False
    assert row["result"].startswith("revert refused: signing: the primary was last replaced")
    assert roles(farm) == before


def test_a_revert_inside_the_retired_certificates_critical_threshold_is_refused(
    promoted: tuple[TestFarm, str, str],
) -> None:
    farm, old, _ = promoted
    # A policy whose critical threshold already covers the retired certificate's NotAfter.
    wide = {
        "certificate_duration": 1000,
        "generation_threshold": 999,
        "critical_threshold": 999,
    }
    before = db_query(farm.dsn, "SELECT id, role FROM certificate ORDER BY id")
    result = farm.run("rollover", "--revert", "--yes", policy=wide)
    assert result.code == 1
    assert f"{old}, expires at" in one_error_line(result)
    assert "so the policy would promote again at once" in one_error_line(result)
    assert db_query(farm.dsn, "SELECT id, role FROM certificate ORDER BY id") == before


def test_an_expired_or_archived_retired_certificate_is_never_made_primary_again(
    farm: TestFarm,
) -> None:
    # Certificates that live 16 s: the retired one expires within the test.
    farm.overrides["policy"] = {
        "threshold_unit_seconds": 1,
        "certificate_duration": 16,
        "generation_threshold": 12,
        "promotion_threshold": 1,
        "critical_threshold": 1,
    }
    expect_ok(farm.run("init"))
    old = holder(farm, "primary")
    # Its successor lives long, so that nothing but the old one's end happens meanwhile.
    farm.overrides["policy"] = {**farm.overrides["policy"], "certificate_duration": 1000}
    expect_ok(farm.run("rollover", "--purpose", "signing"))
    time.sleep(1.1)  # past the one-second promotion threshold
    assert "promote signing" in leader_check(farm)
    assert roles(farm)[old] == "retired"
    not_after = db_query(
        farm.dsn, "SELECT not_after FROM certificate WHERE thumbprint = %s", (old,)
    )[0]["not_after"]
    while db_query(farm.dsn, "SELECT now() > %s AS past", (not_after,))[0]["past"] is False:
        time.sleep(0.5)
    assert "expired at" in refused(farm)
    # A DB writer who moves the date column forward gets the same answer: the leader and
    # the command read NotAfter from the certificate the record's thumbprint names.
    sql(
        farm,
        "UPDATE certificate SET not_after = now() + interval '1 day' WHERE thumbprint = %s",
        (old,),
    )
    assert "expired at" in refused(farm)
    sql(farm, "UPDATE certificate SET not_after = %s WHERE thumbprint = %s", (not_after, old))
    assert "archive signing" in leader_check(farm)
    assert roles(farm)[old] == "archived"
    assert "is archived" in refused(farm)


# -- a config-DB writer -----------------------------------------------------------------------


def test_a_revert_request_edited_in_the_db_is_refused(
    promoted: tuple[TestFarm, str, str],
) -> None:
    farm, old, new = promoted
    request = file_revert(farm)
    body = bytes(request_row(farm, request)["body"])
    pending = "UPDATE rollover_request SET done_at = NULL, ok = NULL, result = NULL"

    def answer(change: str, params: Any = None) -> str:
        sql(farm, f"{pending}{change} WHERE id = {request}", params)
        answer_pending(farm)
        row = request_row(farm, request)
        assert row["ok"] is False, row["result"]
        assert roles(farm) == {old: "retired", new: "primary"}
        return str(row["result"])

    # The kind (the revert column), the purpose: the columns no longer say the body.
    assert "columns do not say what its signed body says" in answer(", revert = false")
    assert "columns do not say" in answer(", revert = true, purpose = 'decryption'")
    # The body made a plain rollover, or another purpose, with the columns to match.
    for old_text, new_text, columns in (
        (b'"kind":"revert"', b'"kind":"rollover"', ", revert = false, purpose = 'signing'"),
        (
            b'"purpose":"signing"',
            b'"purpose":"decryption"',
            ", revert = true, purpose = 'decryption'",
        ),
    ):
        edited = body.replace(old_text, new_text)
        assert edited != body
        assert "MAC does not verify" in answer(f"{columns}, body = %s", (edited,))
    # A plain rollover row made a revert: refused, nothing reverted.
    plain = expect_ok(farm.run("rollover", "--purpose", "decryption"))
    assert plain.code == 0
    last = int(db_query(farm.dsn, "SELECT max(id) AS id FROM rollover_request")[0]["id"])
    assert "columns do not say" in answer_for(farm, last, ", revert = true, purpose = 'signing'")


def answer_for(farm: TestFarm, request: int, change: str) -> str:
    sql(
        farm,
        "UPDATE rollover_request SET done_at = NULL, ok = NULL, result = NULL"
        f"{change} WHERE id = {request}",
    )
    answer_pending(farm)
    row = request_row(farm, request)
    assert row["ok"] is False
    return str(row["result"])


def test_a_db_writer_cannot_forge_or_lift_a_hold(promoted: tuple[TestFarm, str, str]) -> None:
    farm, old, new = promoted
    expect_ok(farm.run("rollover", "--revert", "--yes"))
    stored = db_query(farm.dsn, "SELECT body, mac FROM farm_state")[0]
    document = json.loads(bytes(stored["body"]))
    # Lifting the hold by editing the record: it no longer verifies, so nothing is promoted.
    lifted = json.dumps({**document, "holds": []}, sort_keys=True, separators=(",", ":"))
    sql(farm, "UPDATE farm_state SET body = %s", (lifted.encode(),))
    with pytest.raises(FarmStateError, match="fails authentication"):
        leader_check(farm)
    assert roles(farm) == {old: "primary", new: "secondary"}
    status = farm.run("status", "--json")
    assert status.code == 2 and status.json["farm_state"]["authentic"] is False
    sql(farm, "UPDATE farm_state SET body = %s", (bytes(stored["body"]),))
    # Or by promoting through the rows: the record says otherwise, and nodes refuse it.
    sql(farm, "UPDATE certificate SET role = 'retired' WHERE thumbprint = %s", (old,))
    sql(farm, "UPDATE certificate SET role = 'primary' WHERE thumbprint = %s", (new,))
    synced = farm.run("sync")
    assert synced.code == 1 and "differ from its authenticated farm state" in synced.err
    sql(farm, "UPDATE certificate SET role = 'secondary' WHERE thumbprint = %s", (new,))
    sql(farm, "UPDATE certificate SET role = 'primary' WHERE thumbprint = %s", (old,))
    # Or with a plain rollover request of their own: it carries no MAC, nothing is released.
    sql(
        farm,
        "INSERT INTO rollover_request (requested_by, purpose, urgent)"
        " VALUES ('x', 'signing', false)",
    )
    answer_pending(farm)
    assert record(farm).hold("signing") is not None
    assert leader_check(farm) == []


def test_a_db_writer_cannot_hold_promotions(initialised_farm: TestFarm) -> None:
    # A hold written into a record without the master key fails its MAC: the due promotion
    # is not held by it (the leader writes nothing on an unauthenticated record, and status
    # is critical until the record is restored).
    farm = initialised_farm
    expect_ok(farm.run("rollover", "--purpose", "signing"))
    secondary = holder(farm, "secondary")
    sql(
        farm,
        "UPDATE certificate SET created_at = now() - interval '6 days' WHERE thumbprint = %s",
        (secondary,),
    )
    stored = db_query(farm.dsn, "SELECT body FROM farm_state")[0]
    document = json.loads(bytes(stored["body"]))
    ids = {e["thumbprint"]: e["id"] for e in document["live"]}
    forged = {
        **document,
        "format": "farmkeys-state/3",
        "promotions": [],
        "holds": [{"purpose": "signing", "secondary": ids[secondary], "since": 1}],
    }
    body = json.dumps(forged, sort_keys=True, separators=(",", ":")).encode()
    farm_state.parse(body)  # well formed
    sql(farm, "UPDATE farm_state SET body = %s", (body,))
    with pytest.raises(FarmStateError, match="fails authentication"):
        leader_check(farm)
    status = farm.run("status", "--json")
    assert status.code == 2 and status.json["farm_state"]["promotion_held"] == []
    assert not any("promotion held" in p for p in status.json["problems"])
    sql(farm, "UPDATE farm_state SET body = %s", (bytes(stored["body"]),))
    assert "promote signing" in leader_check(farm)


# -- what the record keeps, and a serving leader -------------------------------------------


def test_records_stay_format_2_until_a_promotion_and_every_change_of_primary_is_recorded(
    initialised_farm: TestFarm,
) -> None:
    farm = initialised_farm
    old = holder(farm, "primary")
    assert record(farm).format == farm_state.FORMAT_2
    expect_ok(farm.run("rollover", "--purpose", "decryption"))
    # Nothing to record yet: the bytes the farmkeys before format 3 reads.
    assert record(farm).format == farm_state.FORMAT_2
    # A generate-and-promote (the critical threshold of a policy that covers the primary's
    # whole life, and no secondary) replaces the signing primary: recorded, the old retired.
    wide = {"certificate_duration": 1000, "generation_threshold": 999, "critical_threshold": 999}
    assert "generate_and_promote signing" in leader_check(farm, policy=wide)
    state = record(farm)
    assert state.format == farm_state.FORMAT
    promotion = state.promotion("signing")
    assert promotion is not None and not promotion.urgent
    assert roles(farm)[old] == "retired"
    ids = {e.thumbprint: e.id for e in state.live}
    assert promotion.previous == ids[old] and promotion.primary == ids[holder(farm, "primary")]
    # With the ordinary policy, that promotion may be reverted.
    expect_ok(farm.run("rollover", "--revert", "--yes"))
    assert roles(farm)[old] == "primary"


CALM_SERVE: dict[str, dict[str, Any]] = {
    "lease": {"ttl_seconds": 3.0, "renew_seconds": 0.5},
    "node": {"poll_seconds": 5},
    "retry": {"total_seconds": 1.0, "initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.2},
}


def test_a_serving_leader_reverts_and_both_nodes_install_it(
    promoted: tuple[TestFarm, str, str],
) -> None:
    farm, old, new = promoted
    expect_ok(farm.run("sync", node="node-b"))
    farm.overrides.update(CALM_SERVE)
    with ServeNodes(farm, farm.root / "logs") as nodes:
        for node in ("node-a", "node-b"):
            nodes.start(node)
        wait_until(lambda: lease_row(farm.dsn)["valid"], 30, "a node leads", detail=nodes.logs)

        def installed(primary: str, secondary: str) -> bool:
            want = {("signing", "primary", primary), ("signing", "secondary", secondary)}
            return all(
                want <= (manifest_identity(farm.store(n)) or set()) for n in ("node-a", "node-b")
            )

        result = expect_ok(farm.run("rollover", "--revert", "--yes"))
        assert "answered by node-" in result.out
        wait_until(
            lambda: installed(old, new), 30, "both nodes install the revert", detail=nodes.logs
        )
        # The leader ran its rollover check after answering: it did not promote again.
        time.sleep(1.0)
        assert roles(farm) == {old: "primary", new: "secondary"}
        # Released: the serving leader's next check promotes it, and the nodes follow.
        expect_ok(farm.run("rollover", "--purpose", "signing"))
        wait_until(
            lambda: roles(farm) == {old: "retired", new: "primary"},
            30,
            "promoted again",
            detail=nodes.logs,
        )
        wait_until(
            lambda: all(
                ("signing", "primary", new) in (manifest_identity(farm.store(n)) or set())
                for n in ("node-a", "node-b")
            ),
            30,
            "both nodes install the promotion",
            detail=nodes.logs,
        )


def test_a_retired_row_whose_certificate_is_not_its_thumbprints_is_not_reverted_to(
    promoted: tuple[TestFarm, str, str],
) -> None:
    # The dates a revert judges come from the certificate itself, so a DB writer who swaps
    # in another certificate's DER (a longer-lived one, say) is refused, not believed.
    farm, old, new = promoted
    sql(
        farm,
        "UPDATE certificate SET der = (SELECT der FROM certificate WHERE thumbprint = %s)"
        " WHERE thumbprint = %s",
        (new, old),
    )
    line = refused(farm)
    assert f"the retired {old}'s certificate in the config DB is not the one its thumbprint" in line
