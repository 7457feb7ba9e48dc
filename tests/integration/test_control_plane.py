"""The authenticated control plane: a config-DB writer cannot steer the leader (issue 19).

Real PostgreSQL, slapd and `farmkeys serve`. Each attack is made as issue 19
describes it, with SQL alone on the farm's own database; then the leader (a
serving node, or the operator's command taking the lease) is woken, and the
test shows that nothing was installed, signed or restored that the leader did
not choose, and that `status` names what is wrong.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from farmtools import (
    TestFarm,
    audit_events,
    db_query,
    expect_ok,
    lease_row,
    one_error_line,
    wait_until,
)
from serving import ServeNodes, manifest_identity

from farmkeys import repair, requesting
from farmkeys.config import LeaseConfig, load
from farmkeys.db import ConfigDB
from farmkeys.directory import Directory
from farmkeys.election import Election
from farmkeys.errors import RequestRefusedError
from farmkeys.formats import farm_state
from farmkeys.formats import request as request_format
from farmkeys.leader import Leader

BIGINT_END = 9223372036854775806  # 2^63 - 2: one more version and the bigint is full

# Nothing rolls over by itself; the lease moves fast, and requests wake the leader at once.
CALM_SERVE: dict[str, dict[str, Any]] = {
    "lease": {"ttl_seconds": 3.0, "renew_seconds": 0.5},
    "node": {"poll_seconds": 5},
    "retry": {"total_seconds": 1.0, "initial_backoff_seconds": 0.05, "max_backoff_seconds": 0.2},
}


@pytest.fixture
def synced_farm(initialised_farm: TestFarm) -> TestFarm:
    """The initialised farm once node-a has synced."""
    expect_ok(initialised_farm.run("sync"))
    return initialised_farm


@pytest.fixture
def nodes(synced_farm: TestFarm) -> Iterator[ServeNodes]:
    with ServeNodes(synced_farm, synced_farm.root / "logs") as started:
        yield started


def sql(farm: TestFarm, *statements: str, params: Any = None) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    with psycopg.connect(farm.dsn, autocommit=True) as conn:
        for statement in statements:
            cur = conn.execute(statement, params)
            if cur.description is not None:
                names = [c.name for c in cur.description]
                found = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    return found


def roles(farm: TestFarm) -> dict[str, tuple[str, str]]:
    rows = db_query(farm.dsn, "SELECT thumbprint, purpose, role FROM certificate")
    return {r["thumbprint"]: (r["purpose"], r["role"]) for r in rows}


def holder(farm: TestFarm, purpose: str, role: str) -> str:
    return next(t for t, pr in roles(farm).items() if pr == (purpose, role))


def record(farm: TestFarm) -> farm_state.FarmState:
    return farm_state.parse(bytes(db_query(farm.dsn, "SELECT body FROM farm_state")[0]["body"]))


def request_row(farm: TestFarm, request: int) -> dict[str, Any]:
    return db_query(farm.dsn, "SELECT * FROM rollover_request WHERE id = %s", (request,))[0]


def forge_request(farm: TestFarm, **columns: Any) -> int:
    """A request row written straight into the config DB, as its writer could."""
    values = {"requested_by": "ops-alice", "purpose": "all", "urgent": False, **columns}
    names = ", ".join(values)
    marks = ", ".join(["%s"] * len(values))
    rows = sql(
        farm,
        f"INSERT INTO rollover_request ({names}) VALUES ({marks}) RETURNING id",
        params=tuple(values.values()),
    )
    return int(rows[0]["id"])


def copy_request(farm: TestFarm, request: int, **changes: Any) -> int:
    """An earlier row put back in the queue, its signed body and MAC with it."""
    row = request_row(farm, request)
    keep = ("requested_by", "purpose", "urgent", "master_key", "repair_state", "body", "mac")
    return forge_request(farm, **{**{k: row[k] for k in keep}, **changes})


def refusals(farm: TestFarm) -> list[dict[str, Any]]:
    return [e for e in audit_events(farm) if e["action"] == "request_refused"]


def critical(farm: TestFarm, fragment: str) -> None:
    result = farm.run("status", "--json")
    assert result.code == 2, result.out + result.err
    assert any(fragment in p for p in result.json["problems"]), result.json["problems"]


def answered(farm: TestFarm, request: int) -> dict[str, Any] | None:
    row = request_row(farm, request)
    return row if row["done_at"] is not None else None


def revoked_file(tmp_path: Path, *thumbprints: str) -> str:
    path = tmp_path / f"revoked-{uuid.uuid4().hex[:6]}"
    path.write_text("# kept revoked\n" + "".join(f"{t}\n" for t in thumbprints))
    return str(path)


# -- 1. a forged promotion through the request queue --------------------------------------


def test_a_forged_repair_request_is_refused_by_the_serving_leader(
    synced_farm: TestFarm, nodes: ServeNodes
) -> None:
    expect_ok(synced_farm.run("rollover", "--purpose", "signing"))  # a secondary to promote
    synced_farm.overrides.update(CALM_SERVE)
    for node in ("node-a", "node-b"):
        nodes.start(node)
    wait_until(lambda: lease_row(synced_farm.dsn)["valid"], 30, "a node leads", detail=nodes.logs)
    primary, secondary = (
        holder(synced_farm, "signing", "primary"),
        holder(synced_farm, "signing", "secondary"),
    )
    wait_until(
        lambda: all(
            manifest_identity(synced_farm.store(n)) is not None
            and ("signing", "secondary", secondary)
            in (manifest_identity(synced_farm.store(n)) or ())
            for n in ("node-a", "node-b")
        ),
        30,
        "both nodes installed the secondary",
        detail=nodes.logs,
    )
    installed = {n: manifest_identity(synced_farm.store(n)) for n in ("node-a", "node-b")}
    version = record(synced_farm).version

    # The attack of issue 19, exactly: two UPDATEs, one INSERT and a NOTIFY.
    sql(
        synced_farm,
        f"UPDATE certificate SET role = 'retired' WHERE thumbprint = '{primary}'",
        f"UPDATE certificate SET role = 'primary' WHERE thumbprint = '{secondary}'",
    )
    forged = forge_request(synced_farm, repair_state=True)
    sql(synced_farm, "SELECT pg_notify('farmkeys_request', '')")

    row = wait_until(lambda: answered(synced_farm, forged), 30, "the forged request is answered")
    assert row["ok"] is False
    assert "carries no MAC" in row["result"]
    assert record(synced_farm).version == version  # no record written
    events = refusals(synced_farm)
    assert len(events) == 1 and "'ops-alice'" in events[0]["detail"]
    assert "state_repair" not in [e["action"] for e in audit_events(synced_farm)]
    # Nodes refuse the forged roles and keep what they had.
    for node in ("node-a", "node-b"):
        assert manifest_identity(synced_farm.store(node)) == installed[node]
    critical(synced_farm, "differ from its authenticated farm state")


def test_a_forged_urgent_rollover_request_rolls_nothing(synced_farm: TestFarm) -> None:
    before = db_query(synced_farm.dsn, "SELECT id, role, blob FROM certificate ORDER BY id")
    forged = forge_request(synced_farm, purpose="signing", urgent=True)
    # The next command that takes the lease answers every pending request.
    expect_ok(synced_farm.run("rollover", "--purpose", "decryption"))
    row = request_row(synced_farm, forged)
    assert row["ok"] is False and "carries no MAC" in row["result"]
    after = db_query(
        synced_farm.dsn,
        "SELECT id, role, blob FROM certificate WHERE purpose = 'signing' ORDER BY id",
    )
    assert after == [r for r in before if r["id"] in {a["id"] for a in after}]
    assert len(after) == 1  # the signing primary alone, untouched
    assert [e["action"] for e in refusals(synced_farm)] == ["request_refused"]


def test_an_authentic_row_replayed_or_changed_is_refused(synced_farm: TestFarm) -> None:
    result = synced_farm.run("rollover", "--purpose", "signing")
    expect_ok(result)
    first = int(db_query(synced_farm.dsn, "SELECT max(id) AS id FROM rollover_request")[0]["id"])
    assert request_row(synced_farm, first)["ok"] is True
    signing = {t: r for t, r in roles(synced_farm).items() if r[0] == "signing"}
    signed = bytes(request_row(synced_farm, first)["body"])
    tampered = json.loads(signed)
    tampered["urgent"] = True
    edited = json.dumps(tampered, sort_keys=True, separators=(",", ":")).encode()
    pending = "UPDATE rollover_request SET done_at = NULL, ok = NULL, result = NULL"

    def answer(*changes: str, params: Any = None) -> str:
        """Put the operator's answered row back in the queue with ``changes``; the answer."""
        sql(synced_farm, *[f"{pending}{c} WHERE id = {first}" for c in changes], params=params)
        expect_ok(synced_farm.run("rollover", "--purpose", "decryption"))
        row = request_row(synced_farm, first)
        assert row["ok"] is False, row["result"]
        assert {t: r for t, r in roles(synced_farm).items() if r[0] == "signing"} == signing
        return str(row["result"])

    # Its kind flipped in the columns; put back as it was; its body with one field changed.
    assert "columns do not say what its signed body says" in answer(
        ", repair_state = true, purpose = 'all'"
    )
    assert "was answered before" in answer(", repair_state = false, purpose = 'signing'")
    assert "MAC does not verify" in answer(", urgent = true, body = %s", params=(edited,))
    # A copy under another row id.
    copied = copy_request(synced_farm, first, body=signed)
    expect_ok(synced_farm.run("rollover", "--purpose", "decryption"))
    assert "another request row" in request_row(synced_farm, copied)["result"]
    assert len(refusals(synced_farm)) == 4
    assert all("'node-a'" in e["detail"] for e in refusals(synced_farm))


def test_an_expired_request_is_refused(synced_farm: TestFarm) -> None:
    cfg = load(synced_farm.config())
    with ConfigDB(cfg.database, cfg.retry) as db, Directory(cfg.directory, cfg.retry) as dirx:
        request = requesting.file_request(
            cfg, db, dirx, kind="rollover", purpose="signing", urgent=True, lifetime_seconds=0
        )
    # Its maker's clock said it expires a minute after it was made: an hour later it is stale.
    body = request_format.parse(bytes(request_row(synced_farm, request)["body"]))
    request_format.check_fresh(body, now=body.created + 30)
    with pytest.raises(RequestRefusedError, match="expired"):
        request_format.check_fresh(body, now=body.created + 3600)
    with pytest.raises(RequestRefusedError, match="future"):
        request_format.check_fresh(body, now=body.created - 3600)


# -- 2. a compromised key brought back ----------------------------------------------------


def test_a_zeroed_mac_and_a_forged_repair_cannot_revive_an_urgently_replaced_key(
    synced_farm: TestFarm, tmp_path: Path
) -> None:
    old = holder(synced_farm, "signing", "primary")
    expect_ok(synced_farm.run("rollover", "--purpose", "signing", "--urgent", "--yes"))
    expect_ok(synced_farm.run("sync"))
    new = holder(synced_farm, "signing", "primary")
    sql(
        synced_farm,
        f"UPDATE certificate SET role = 'archived' WHERE thumbprint = '{new}'",
        f"UPDATE certificate SET role = 'primary' WHERE thumbprint = '{old}'",
        "UPDATE farm_state SET mac = decode(repeat('00', 32), 'hex')",
    )
    forged = forge_request(synced_farm, repair_state=True)
    answer = synced_farm.run("rollover", "--purpose", "decryption")  # takes the lease, answers all
    assert answer.code == 1
    assert request_row(synced_farm, forged)["ok"] is False
    assert "carries no MAC" in request_row(synced_farm, forged)["result"]
    # A brand-new node installs nothing.
    fresh = synced_farm.run("sync", node="node-new")
    assert fresh.code == 1
    assert "fails authentication" in one_error_line(fresh)
    assert not (synced_farm.store("node-new") / "current").exists()
    critical(synced_farm, "fails authentication")

    # The operator's own repair: without a verifying record it must be told what stays
    # revoked, and it shows what nodes remember.
    unnamed = synced_farm.run("repair-state", "--yes")
    assert unnamed.code == 1
    assert "--revoked FILE" in one_error_line(unnamed)
    shown = synced_farm.run("repair-state", "--revoked", revoked_file(tmp_path))  # no terminal
    assert shown.code == 1
    assert f"'node-a' remember {old} as urgently replaced" in shown.out
    # The operator keeps it: the old key is archived again, the fresh node never gets it.
    kept = synced_farm.run("repair-state", "--yes", "--revoked", revoked_file(tmp_path, old))
    expect_ok(kept)
    assert f"{old}: urgently replaced before; archived again" in kept.out
    assert old in record(synced_farm).revoked
    expect_ok(synced_farm.run("rollover", "--purpose", "signing", "--urgent", "--yes"))
    fresh = synced_farm.run("sync", node="node-fresh")
    expect_ok(fresh)
    assert old not in fresh.out


def test_repair_state_asks_first_and_never_drops_a_revoked_thumbprint(
    synced_farm: TestFarm,
) -> None:
    old = holder(synced_farm, "signing", "primary")
    expect_ok(synced_farm.run("rollover", "--purpose", "signing", "--urgent", "--yes"))
    version = record(synced_farm).version
    # Nothing wrong: nothing to repair, nothing written.
    calm = synced_farm.run("repair-state", "--yes")
    expect_ok(calm)
    assert "nothing to repair" in calm.out
    assert record(synced_farm).version == version
    # Something wrong, no terminal and no --yes: refused, nothing written.
    new = holder(synced_farm, "signing", "primary")
    sql(synced_farm, f"UPDATE certificate SET role = 'retired' WHERE thumbprint = '{new}'")
    asked = synced_farm.run("repair-state")
    assert asked.code == 1
    assert "no terminal to ask at" in one_error_line(asked)
    assert "is live but not in the farm state" in asked.out or "is retired" in asked.out
    assert record(synced_farm).version == version
    repaired = synced_farm.run("repair-state", "--yes")
    expect_ok(repaired)
    assert old in record(synced_farm).revoked  # the verifying record's list is kept


def test_a_repair_is_refused_when_the_rows_changed_after_the_review(synced_farm: TestFarm) -> None:
    expect_ok(synced_farm.run("rollover", "--purpose", "signing"))
    secondary = holder(synced_farm, "signing", "secondary")
    sql(synced_farm, f"UPDATE certificate SET role = 'retired' WHERE thumbprint = '{secondary}'")
    cfg = load(synced_farm.config())
    with ConfigDB(cfg.database, cfg.retry) as db, Directory(cfg.directory, cfg.retry) as dirx:
        review = repair.review(db, dirx, revoked_file=None)
        assert review.needed
        # Between the operator's review and the leader's act, the rows change again.
        sql(
            synced_farm,
            "UPDATE certificate SET role = 'retired' WHERE role = 'primary' AND purpose ="
            f" 'signing' AND thumbprint <> '{secondary}'",
            f"UPDATE certificate SET role = 'primary' WHERE thumbprint = '{secondary}'",
        )
        version = record(synced_farm).version
        outcome = requesting.request_rollover(
            cfg, db, dirx, purpose="all", urgent=False, repair=review.terms, timeout_seconds=30
        )
    assert not outcome.ok
    assert "changed since the operator reviewed them" in outcome.result
    assert record(synced_farm).version == version


# -- 3. the version ceiling --------------------------------------------------------------


def test_a_forged_version_column_cannot_freeze_the_farm(synced_farm: TestFarm) -> None:
    version = record(synced_farm).version
    sql(synced_farm, f"UPDATE farm_state SET version = {BIGINT_END}")
    critical(synced_farm, f"version column says {BIGINT_END}")
    result = synced_farm.run("rollover", "--purpose", "signing", "--urgent", "--yes")
    expect_ok(result)
    assert record(synced_farm).version == version + 1
    assert db_query(synced_farm.dsn, "SELECT version FROM farm_state")[0]["version"] == version + 1
    fresh = synced_farm.run("sync", node="node-fresh")
    expect_ok(fresh)
    assert synced_farm.run("status").code != 2


def test_a_forged_node_version_cannot_freeze_the_farm(synced_farm: TestFarm) -> None:
    version = record(synced_farm).version
    sql(synced_farm, f"INSERT INTO node (id, state_version) VALUES ('forged', {BIGINT_END})")
    critical(synced_farm, f"node forged installed farm state version {BIGINT_END}")
    result = synced_farm.run("rollover", "--purpose", "signing", "--urgent", "--yes")
    expect_ok(result)
    assert record(synced_farm).version == version + 1
    fresh = synced_farm.run("sync", node="node-fresh")
    expect_ok(fresh)
    # A repair never takes the forged version as its floor.
    sql(synced_farm, "UPDATE farm_state SET mac = decode(repeat('00', 32), 'hex')")
    shown = synced_farm.run("repair-state", "--yes", "--revoked", "/dev/null")
    assert "node 'forged' reports farm state version" in shown.out
    expect_ok(shown)
    assert record(synced_farm).version < 1 << 32


# -- master-key rolls and pending requests -----------------------------------------------


def _leader(farm: TestFarm) -> tuple[Leader, ConfigDB, Directory, Any]:
    cfg = load(farm.config())
    db = ConfigDB(cfg.database, cfg.retry).__enter__()
    dirx = Directory(cfg.directory, cfg.retry).__enter__()
    election = Election(db, node_id="node-a", lease=LeaseConfig(ttl_seconds=60, renew_seconds=1))
    assert election.try_acquire()
    return Leader(cfg, db, dirx, election), db, dirx, cfg


@pytest.mark.parametrize("urgent", [False, True])
def test_a_request_pending_across_a_master_key_roll(synced_farm: TestFarm, urgent: bool) -> None:
    leader, db, dirx, cfg = _leader(synced_farm)
    try:
        request = requesting.file_request(
            cfg, db, dirx, kind="rollover", purpose="signing", urgent=False, lifetime_seconds=60
        )
        signed_under = request_format.parse(
            bytes(request_row(synced_farm, request)["body"])
        ).master_key
        group = db.require_farm()
        leader.roll_master_key(group, urgent=urgent, request=None)
        assert record(synced_farm).master_key != signed_under
        leader.answer_requests()
    finally:
        dirx.__exit__(None, None, None)
        db.__exit__(None, None, None)
    row = request_row(synced_farm, request)
    if urgent:  # its key is deleted: the maker re-issues it
        assert row["ok"] is False
        assert "cannot be read" in row["result"]
        assert "secondary" not in {r for _, r in roles(synced_farm).values()}
    else:  # the replaced key is still in the directory: the request stands
        assert row["ok"] is True, row["result"]
        assert holder(synced_farm, "signing", "secondary")
