"""Secrets stay secret: no private key in the config DB, no key or password in any output."""

from __future__ import annotations

import base64
import subprocess
import threading
import time
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives import serialization
from farmtools import TestFarm, add_certificate, expect_ok, hold_lease, one_error_line

from farmkeys.config import load
from farmkeys.directory import Directory
from farmkeys_lab.postgres import LocalPostgres, find_bindir


def private_key_ders(store: Path) -> set[bytes]:
    """Every installed private key, as PKCS#8 and as traditional DER."""
    found = set()
    for path in sorted(store.glob("*/*.key")):
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        for fmt in (
            serialization.PrivateFormat.PKCS8,
            serialization.PrivateFormat.TraditionalOpenSSL,
        ):
            found.add(
                key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
            )
    return found


def test_a_pg_dump_of_the_config_db_holds_no_private_key(
    initialised_farm: TestFarm, postgres: LocalPostgres
) -> None:
    add_certificate(initialised_farm, purpose="signing", role="secondary")
    expect_ok(initialised_farm.run("sync"))
    ders = private_key_ders(initialised_farm.store())
    assert len(ders) == 6  # three certificates installed, two encodings each

    bindir = find_bindir()
    assert bindir is not None
    dump = subprocess.run(
        [str(bindir / "pg_dump"), "--no-password", "--dbname", initialised_farm.dsn],
        capture_output=True,
        check=True,
    ).stdout
    assert b"COPY public.certificate" in dump  # the dump really holds the certificate rows
    assert b"PRIVATE KEY" not in dump
    for der in ders:
        assert der not in dump
        assert der.hex().encode() not in dump  # bytea is dumped as hex
        assert base64.b64encode(der) not in dump


def test_no_output_or_log_line_carries_a_master_key_or_a_password(
    initialised_farm: TestFarm,
) -> None:
    cfg = load(initialised_farm.config())
    (group,) = (
        psycopg.connect(initialised_farm.dsn).execute("SELECT dkm_group FROM farm").fetchone() or ()
    )
    with Directory(cfg.directory, cfg.retry) as directory:
        key = directory.master_key(group, directory.current_key_id(group))
    secrets = [
        key.hex(),
        key.hex().upper(),
        base64.b64encode(key).decode(),
        key.decode("latin-1"),
        initialised_farm.slapd.service_password,
        initialised_farm.slapd.admin_password,
    ]

    hold_lease(initialised_farm)
    outputs = []
    for args in (("init",), ("sync",), ("status",), ("status", "--json"), ("db", "upgrade")):
        result = initialised_farm.spawn("--debug", *args)
        expect_ok(result)
        outputs += [result.out, result.err]
    # Failures too: a corrupted blob, a wrong directory password, a DSN with a password.
    add_certificate(initialised_farm, purpose="decryption", role="secondary")
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute("UPDATE certificate SET blob = substr(blob, 1, 80) WHERE role = 'secondary'")
    failures = [
        initialised_farm.spawn("--debug", "sync"),
        initialised_farm.spawn(
            "--debug",
            "sync",
            directory={
                "password": "wrong-" + initialised_farm.slapd.service_password,
                "password_file": None,
            },
        ),
        initialised_farm.spawn(
            "--debug", "status", database={"dsn": "postgresql://u:hunter2-secret@127.0.0.1:1/x"}
        ),
    ]
    for result in failures:
        assert result.code != 0
        one_error_line(result)
        outputs += [result.out, result.err]
    secrets.append("hunter2-secret")

    text = "\n".join(outputs)
    assert "farmkeys: debug: " in text  # --debug really produced log lines to search
    for secret in secrets:
        assert secret not in text


# -- text from the config DB cannot forge output ------------------------------------------

FORGED_ID = "node-x\n  health OK\x1b[8m"
FORGED_ERROR = "boom\x1b[2J\r\u202eKO \x9b31m\u2028done\x7f"
# The characters escape() shows escaped (tests/unit/test_terminal.py checks it on each of them).
CONTROLS = {
    *map(chr, range(0x20)),
    "\x7f",
    *map(chr, range(0x80, 0xA0)),
    "\u2028",
    "\u2029",
    *map(chr, range(0x202A, 0x202F)),
    *map(chr, range(0x2066, 0x206A)),
}


def raw_controls(text: str) -> set[str]:
    """Control characters in ``text`` other than the line breaks between its lines."""
    return {c for line in text.split("\n") for c in line if c in CONTROLS}


def test_a_forged_node_row_and_audit_event_cannot_forge_status_or_events_output(
    initialised_farm: TestFarm,
) -> None:
    expect_ok(initialised_farm.run("sync"))
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute(
            "INSERT INTO node (id, last_sync, generation, last_error, heartbeat_at,"
            " directory_error, hook_error, directory_server)"
            " VALUES (%s, now(), 1, %s, now(), %s, %s, %s)",
            (FORGED_ID, FORGED_ERROR, FORGED_ERROR, FORGED_ERROR, "dc\x1b]0;owned\x07"),
        )
        conn.execute(
            "INSERT INTO audit_event (node, term, action, detail) VALUES (%s, 1, %s, %s)",
            (FORGED_ID, "sync\x1b[1A", FORGED_ERROR),
        )
    narrow = initialised_farm.spawn("status")
    # The escaped texts whole, on one line each (100 columns would wrap them at a space).
    status = initialised_farm.spawn("status", "--wide")
    events = initialised_farm.spawn("events")
    assert status.code == narrow.code == 1, status.err  # the forged node's errors are warnings
    expect_ok(events)
    assert raw_controls(narrow.out) == set(), narrow.out
    assert not any(
        line.startswith(("  health OK", "health")) for line in narrow.out.splitlines()[2:]
    )
    for result in (status, events):
        assert raw_controls(result.out) == set(), result.out
        assert "node-x\\n  health OK\\x1b[8m" in result.out
        assert "boom\\x1b[2J\\r\\u202eKO \\x9b31m\\u2028done\\x7f" in result.out
        assert not any(line.startswith("  health OK") for line in result.out.splitlines())
    assert "health    WARNING" in status.out
    assert "directory dc\\x1b]0;owned\\x07" in status.out
    assert "sync\\x1b[1A" in events.out

    # JSON keeps the text exactly, as JSON escapes: no raw control character either.
    for args in (("status", "--json"), ("events", "--json")):
        result = initialised_farm.spawn(*args)
        assert raw_controls(result.out) == set(), result.out
    nodes = {n["id"]: n for n in initialised_farm.spawn("status", "--json").json["nodes"]}
    assert nodes[FORGED_ID]["last_error"] == FORGED_ERROR
    (forged,) = [
        e for e in initialised_farm.spawn("events", "--json").json if e["node"] == FORGED_ID
    ]
    assert forged["detail"] == FORGED_ERROR


def test_a_forged_answer_or_lease_holder_cannot_forge_the_commands_output(
    initialised_farm: TestFarm,
) -> None:
    # A "leader" that never answers: the forger answers the request in its place.
    hold_lease(initialised_farm)
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute(
            "UPDATE leader_lease SET holder_node = %s", ("node-a\n  rollover done\x1b[8m",)
        )
    forged_answer = "signing: new secondary\x1b[8m\n\x1b[1A\x1b[2Kall fine\u202e"

    def forge() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with psycopg.connect(initialised_farm.dsn, autocommit=True) as conn:
                row = conn.execute(
                    "UPDATE rollover_request SET done_at = now(), done_by = %s, term = 1,"
                    " ok = true, result = %s WHERE done_at IS NULL RETURNING id",
                    (FORGED_ID, forged_answer),
                ).fetchone()
            if row:
                return
            time.sleep(0.05)

    forger = threading.Thread(target=forge)
    forger.start()
    answered = initialised_farm.spawn("rollover", "--wait", "30")
    forger.join()
    expect_ok(answered)
    assert raw_controls(answered.out) == set(), answered.out
    lines = answered.out.splitlines()
    assert "answered by node-x\\n  health OK\\x1b[8m (term 1):" in lines[0]
    assert lines[1:] == ["  signing: new secondary\\x1b[8m", "  \\x1b[1A\\x1b[2Kall fine\\u202e"]

    # Nobody answers in time: the error names the lease's holder, escaped, on one line.
    timed_out = initialised_farm.spawn("rollover", "--wait", "0.3")
    assert timed_out.code == 1
    assert raw_controls(timed_out.err) == set(), timed_out.err
    assert "the leader (node-a\\n  rollover done\\x1b[8m) did not answer" in one_error_line(
        timed_out
    )
    debug = initialised_farm.spawn("--debug", "rollover", "--wait", "0.3")
    assert "Traceback" in debug.err
    assert raw_controls(debug.err) == set(), debug.err


def test_a_forged_dkm_container_cannot_forge_an_error_line(initialised_farm: TestFarm) -> None:
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute("UPDATE farm SET dkm_container = %s", ("ou=x\nfarmkeys: ok\x1b[8m",))
    result = initialised_farm.spawn("init")
    assert result.code == 1
    assert raw_controls(result.err) == set(), result.err
    assert "the farm's DKM container is ou=x\\nfarmkeys: ok\\x1b[8m," in one_error_line(result)
