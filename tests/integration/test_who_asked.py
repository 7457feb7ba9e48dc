"""Who asked (issue 22): every audited action an operator's request caused names the
account, host and `--reason` its signed body carries, on real PostgreSQL and slapd.

Without a serving node, the command takes the lease and answers its own request (and any
other pending one) with the leader's code, as tests/integration/test_control_plane.py does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import pwd
import socket
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from adfs_encoder import encode
from farmtools import TestFarm, db_query, expect_ok, one_error_line

from farmkeys import operator, requesting
from farmkeys.config import load
from farmkeys.db import ConfigDB
from farmkeys.directory import Directory
from farmkeys.formats import certificates as certificate_format
from farmkeys.formats import request as request_format

ME = pwd.getpwuid(os.geteuid()).pw_name
HOST = socket.gethostname()
ALICE = f"alice via sudo as {ME}"
CONTROLS = {chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} | {"\u202e", "\u2028"}


@pytest.fixture
def synced_farm(initialised_farm: TestFarm) -> TestFarm:
    expect_ok(initialised_farm.run("sync"))
    return initialised_farm


@pytest.fixture
def alice(monkeypatch: pytest.MonkeyPatch) -> str:
    """The commands run as if alice ran them through sudo."""
    monkeypatch.setenv("SUDO_USER", "alice")
    return ALICE


def sql(farm: TestFarm, statement: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(farm.dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        if cur.description is None:
            return []
        names = [c.name for c in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def last_request(farm: TestFarm) -> int:
    return int(db_query(farm.dsn, "SELECT max(id) AS id FROM rollover_request")[0]["id"])


def request_row(farm: TestFarm, request: int) -> dict[str, Any]:
    return db_query(farm.dsn, "SELECT * FROM rollover_request WHERE id = %s", (request,))[0]


def events(farm: TestFarm) -> list[dict[str, Any]]:
    return list(expect_ok(farm.run("events", "--json")).json)


def asked_for(farm: TestFarm, request: int) -> list[dict[str, Any]]:
    """The events `events --json` says request ``request`` caused."""
    return [e for e in events(farm) if (e["requester"] or {}).get("request") == request]


def file_pending(farm: TestFarm, *, reason: str | None, urgent: bool = True) -> int:
    """A signed request, filed as `rollover` files it, that nobody answers yet."""
    cfg = load(farm.config())
    with ConfigDB(cfg.database, cfg.retry) as db, Directory(cfg.directory, cfg.retry) as dirx:
        return requesting.file_request(
            cfg,
            db,
            dirx,
            kind="rollover",
            purpose="signing",
            urgent=urgent,
            lifetime_seconds=120,
            reason=reason,
        )


def answer_pending(farm: TestFarm) -> None:
    """A command that takes the lease answers every pending request first."""
    expect_ok(farm.run("rollover", "--purpose", "decryption"))


def signing_rows(farm: TestFarm) -> list[dict[str, Any]]:
    return db_query(
        farm.dsn, "SELECT id, role FROM certificate WHERE purpose = 'signing' ORDER BY id"
    )


# -- what events shows --------------------------------------------------------------------


def test_a_rollover_with_a_reason_shows_account_host_and_reason_in_events(
    synced_farm: TestFarm, alice: str
) -> None:
    reason = "CHG-42: the signing key may have leaked"
    expect_ok(
        synced_farm.run("rollover", "--purpose", "signing", "--urgent", "--yes", "--reason", reason)
    )
    request = last_request(synced_farm)
    row = request_row(synced_farm, request)
    assert (row["account"], row["host"], row["reason"]) == (alice, HOST, reason)

    caused = asked_for(synced_farm, request)
    assert sorted(e["action"] for e in caused) == ["archive", "generate_and_promote"]
    for e in caused:
        assert e["requester"] == {
            "request": request,
            "account": alice,
            "host": HOST,
            "reason": reason,
        }
    # init was no request: it names who ran it, with no request id.
    assert all(
        e["requester"]["request"] is None for e in events(synced_farm) if e["action"] == "init"
    )

    text = expect_ok(synced_farm.run("events")).out.splitlines()
    asked = f"[request {request} by {alice} on {HOST}: {reason!r}]"
    lines = [line for line in text if asked in line]
    assert len(lines) == 2, text
    assert any(" archive signing " in line for line in lines)
    assert any(" generate_and_promote signing " in line for line in lines)
    assert not any("[request" in line for line in text if " init " in line)


def test_a_request_without_a_reason_still_names_account_and_host(
    synced_farm: TestFarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SUDO_USER", raising=False)
    expect_ok(synced_farm.run("rollover", "--purpose", "signing"))
    request = last_request(synced_farm)
    (made,) = asked_for(synced_farm, request)
    assert made["action"] == "generate"
    assert made["requester"] == {"request": request, "account": ME, "host": HOST, "reason": None}


def test_every_event_of_an_urgent_master_key_roll_names_who_asked(
    synced_farm: TestFarm, alice: str
) -> None:
    before = {e["id"] for e in events(synced_farm)}
    expect_ok(
        synced_farm.run(
            "rollover", "--master-key", "--urgent", "--yes", "--reason", "DKM backup lost"
        )
    )
    request = last_request(synced_farm)
    new = [e for e in events(synced_farm) if e["id"] not in before]
    actions = {e["action"] for e in new}
    assert {"master_key_add", "master_key_roll", "master_key_delete"} <= actions, actions
    for e in new:
        assert e["requester"] == {
            "request": request,
            "account": alice,
            "host": HOST,
            "reason": "DKM backup lost",
        }, e


def test_repair_state_and_import_adfs_name_who_asked(
    synced_farm: TestFarm, alice: str, tmp_path: Path
) -> None:
    # A repair after a DB writer retired the signing primary.
    sql(synced_farm, "UPDATE certificate SET role = 'retired' WHERE purpose = 'signing'")
    expect_ok(synced_farm.run("repair-state", "--yes", "--reason", "restored from backup"))
    request = last_request(synced_farm)
    repaired = asked_for(synced_farm, request)
    assert "state_repair" in {e["action"] for e in repaired}
    assert {e["requester"]["reason"] for e in repaired} == {"restored from backup"}
    assert {e["requester"]["account"] for e in repaired} == {alice}

    # An AD FS certificate brought across.
    dkm_key, dkm_id = bytes(range(7, 39)), uuid.UUID(int=99)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    made = certificate_format.generate(
        farm_name="adfs.contoso.example",
        purpose="signing",
        key_type="rsa-2048",
        not_before=start,
        not_after=start + timedelta(days=365),
    )
    pkcs12 = certificate_format.to_pkcs12(made.certificate, made.key, friendly_name="")
    pfx = tmp_path / "signing.pfx"
    pfx.write_bytes(base64.b64encode(encode(pkcs12, dkm_key=dkm_key, key_id=dkm_id)))
    key = tmp_path / "dkm.key"
    key.write_text(dkm_key.hex() + "\n")
    key.chmod(0o600)
    expect_ok(
        synced_farm.run(
            "import", "adfs", "--encrypted-pfx", str(pfx), "--purpose", "signing",
            "--role", "primary", "--dkm-key-file", str(key), "--reason", "migrating from AD FS",
        )
    )  # fmt: skip
    request = last_request(synced_farm)
    imported = asked_for(synced_farm, request)
    assert "import" in {e["action"] for e in imported}  # the repair left no primary to retire
    assert {e["requester"]["reason"] for e in imported} == {"migrating from AD FS"}


# -- a DB writer forges who asked ---------------------------------------------------------


def test_a_db_writer_who_changes_who_asked_gets_the_request_refused(
    synced_farm: TestFarm, alice: str
) -> None:
    signing = signing_rows(synced_farm)
    reason_changed = file_pending(synced_farm, reason="mine")
    account_changed = file_pending(synced_farm, reason="mine")
    body_changed = file_pending(synced_farm, reason="mine")
    sql(synced_farm, f"UPDATE rollover_request SET reason = 'routine' WHERE id = {reason_changed}")
    sql(synced_farm, f"UPDATE rollover_request SET account = 'bob' WHERE id = {account_changed}")
    # The body and the column changed alike, so the columns agree with the body.
    body = json.loads(bytes(request_row(synced_farm, body_changed)["body"]))
    body["account"] = "bob"
    forged = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    sql(
        synced_farm,
        "UPDATE rollover_request SET body = %s, account = 'bob' WHERE id = %s",
        (forged, body_changed),
    )
    answer_pending(synced_farm)

    for request, why in (
        (reason_changed, "columns do not say what its signed body says"),
        (account_changed, "columns do not say what its signed body says"),
        (body_changed, "its MAC does not verify"),
    ):
        row = request_row(synced_farm, request)
        assert row["ok"] is False and why in row["result"], row["result"]
    assert signing_rows(synced_farm) == signing  # nothing rolled
    refused = [e for e in events(synced_farm) if e["action"] == "request_refused"]
    assert len(refused) == 3
    # Only the claim is recorded, as a claim: never in the requester.
    assert all(e["requester"] is None for e in refused)
    details = {e["detail"].split(":")[0] for e in refused}
    assert details == {
        f"request {reason_changed} (claimed requester 'node-a', claimed account {alice!r},"
        f" claimed host {HOST!r})",
        f"request {account_changed} (claimed requester 'node-a', claimed account 'bob',"
        f" claimed host {HOST!r})",
        f"request {body_changed} (claimed requester 'node-a', claimed account 'bob',"
        f" claimed host {HOST!r})",
    }


def test_a_forged_requester_is_escaped_on_the_terminal(synced_farm: TestFarm) -> None:
    # A row without a MAC, claiming an account and host that would forge lines.
    sql(
        synced_farm,
        "INSERT INTO rollover_request (requested_by, purpose, urgent, account, host, reason)"
        " VALUES ('node-a', 'signing', true, %s, %s, %s)",
        ("alice\n2026-12-04T00:00:00  node-a  term 1 health OK", "web\x1b[8m1", "x\u202ey"),
    )
    # An audit event a DB writer wrote, naming a requester in its columns.
    sql(
        synced_farm,
        "INSERT INTO audit_event (node, term, action, detail, request, account, host, reason)"
        " VALUES ('node-a', 1, 'generate', '', 1, %s, %s, %s)",
        ("root\r\x1b[2K", "web1\u2028", "fine\n  health OK\x9b31m"),
    )
    answer_pending(synced_farm)
    shown = synced_farm.spawn("events")
    expect_ok(shown)
    assert {c for line in shown.out.split("\n") for c in line if c in CONTROLS} == set()
    assert not any(line.lstrip().startswith(("2026-12-04T00", "health OK")) for line in
                   shown.out.splitlines())  # fmt: skip
    assert "claimed account 'alice\\n2026-12-04T00:00:00  node-a  term 1 health OK'" in shown.out
    assert "claimed host 'web\\x1b[8m1'" in shown.out
    assert "by root\\r\\x1b[2K on web1\\u2028: 'fine\\n  health OK\\x9b31m'" in shown.out
    document = synced_farm.spawn("events", "--json")
    assert {c for line in document.out.split("\n") for c in line if c in CONTROLS} == set()
    (forged,) = [
        e for e in document.json if (e["requester"] or {}).get("account") == "root\r\x1b[2K"
    ]
    assert forged["requester"]["reason"] == "fine\n  health OK\x9b31m"


# -- a rolling upgrade --------------------------------------------------------------------


def test_a_request_of_an_older_farmkeys_is_carried_out_and_named_as_not_recorded(
    synced_farm: TestFarm, caplog: pytest.LogCaptureFixture
) -> None:
    """A command of a farmkeys before request format 2 (no account, host or reason) during a
    rolling upgrade: the new leader carries it out and records who asked as not recorded."""
    cfg = load(synced_farm.config())
    with ConfigDB(cfg.database, cfg.retry) as db, Directory(cfg.directory, cfg.retry) as dirx:
        group = db.require_farm().dkm_group
        key_id = dirx.current_key_id(group)
        key = dirx.master_key(group, key_id)
    (row,) = sql(
        synced_farm,
        "INSERT INTO rollover_request (requested_by, purpose, urgent) VALUES ('node-b',"
        " 'signing', false) RETURNING id, now() AS now",
    )
    created = int(row["now"].timestamp())
    old = request_format.Request(
        id=row["id"],
        nonce=uuid.uuid4(),
        farm=group,
        kind="rollover",
        purpose="signing",
        urgent=False,
        requested_by="node-b",
        created=created,
        expires=created + 180,
        master_key=key_id,
    )
    body = old.encode()
    assert json.loads(body)["format"] == "farmkeys-request/1"
    mac = hmac.new(request_format.mac_key(key, group), body, hashlib.sha256).digest()
    sql(
        synced_farm,
        "UPDATE rollover_request SET body = %s, mac = %s WHERE id = %s",
        (body, mac, row["id"]),
    )
    with caplog.at_level(logging.WARNING, logger="farmkeys.leader"):
        answer_pending(synced_farm)
    (warned,) = [r.getMessage() for r in caplog.records if "request format 2" in r.getMessage()]
    assert warned.startswith(f"request {row['id']} (rollover of signing) was filed by a farmkeys")
    assert warned.endswith("with who asked not recorded; upgrade farmkeys on node node-b")
    assert request_row(synced_farm, row["id"])["ok"] is True
    (made,) = asked_for(synced_farm, row["id"])
    assert made["action"] == "generate"
    assert made["requester"] == {
        "request": row["id"],
        "account": None,
        "host": None,
        "reason": None,
    }
    text = expect_ok(synced_farm.run("events")).out
    assert f"[request {row['id']} by a requester not recorded (an older farmkeys filed it)]" in text


def test_a_leader_older_than_the_command_refuses_its_request_and_the_command_says_why(
    synced_farm: TestFarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other half of a rolling upgrade: a leader that reads request format 1 alone (its
    field list, as farmkeys before issue 22 had it) refuses a format-2 body as malformed,
    does nothing, and the upgraded command names the cause in one line."""
    monkeypatch.setattr(request_format, "_FIELDS", request_format._FIELDS_1)
    signing = signing_rows(synced_farm)
    result = synced_farm.run(
        "rollover", "--purpose", "signing", "--urgent", "--yes", "--reason", "x"
    )
    assert result.code == 1, result.out + result.err
    line = one_error_line(result)
    assert "runs a farmkeys older than this command's request format" in line
    assert "upgrade farmkeys on the leader first" in line
    row = request_row(synced_farm, last_request(synced_farm))
    assert row["ok"] is False and "does not have exactly the fields" in row["result"]
    assert signing_rows(synced_farm) == signing


def test_init_and_escrow_name_who_ran_them(farm: TestFarm, tmp_path: Path) -> None:
    """Commands that change the farm themselves (no request, no leader) record their own
    account, host and --reason."""
    me, host = operator.account(), socket.gethostname()
    expect_ok(farm.run("init", "--reason", "new farm, CHG-1"))
    passphrase = tmp_path / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    passphrase.chmod(0o600)
    out = tmp_path / "keys.age"
    expect_ok(
        farm.run(
            "escrow",
            "export",
            "--out",
            str(out),
            "--passphrase-file",
            str(passphrase),
            "--reason",
            "yearly escrow",
        )
    )
    events = {e["action"]: e for e in farm.run("events", "--json").json}
    assert events["init"]["requester"] == {
        "request": None,
        "account": me,
        "host": host,
        "reason": "new farm, CHG-1",
    }
    assert events["escrow_export"]["requester"] == {
        "request": None,
        "account": me,
        "host": host,
        "reason": "yearly escrow",
    }
    assert "lead" not in events  # no leader was involved
    text = farm.run("events").out
    assert f"[by {me} on {host}: 'yearly escrow']" in text
