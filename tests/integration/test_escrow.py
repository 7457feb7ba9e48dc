"""Escrow export and import against the real config DB and slapd, and the disaster drill.

The files are real age files at age's default work factor (about a second of
scrypt each way on this machine), so each test opens only the few it needs.
"""

from __future__ import annotations

import json
import os
import pty
import select
import sys
import time
import uuid
from pathlib import Path

import ldap3
import psycopg
import pytest
from farmtools import REPO, TestFarm, audit_events, clean_env, db_query, expect_ok, one_error_line

from farmkeys.config import load
from farmkeys.directory import Directory
from farmkeys.escrow import EscrowDocument, EscrowedKey
from farmkeys.formats import escrow_file
from farmkeys_lab.slapd import LocalSlapd

PASSPHRASE = "correct horse battery staple"


def passphrase_file(tmp_path: Path, text: str = PASSPHRASE, mode: int = 0o600) -> str:
    path = tmp_path / f"passphrase-{uuid.uuid4().hex[:6]}"
    path.write_text(text + "\n")
    path.chmod(mode)
    return str(path)


def group_of(farm: TestFarm) -> uuid.UUID:
    return uuid.UUID(str(db_query(farm.dsn, "SELECT dkm_group FROM farm")[0]["dkm_group"]))


def directory_keys(farm: TestFarm) -> dict[uuid.UUID, bool]:
    config = load(farm.config())
    with Directory(config.directory, config.retry) as fresh:
        if not fresh.container_exists(group_of(farm)):
            return {}
        return {k.id: k.current for k in fresh.list_keys(group_of(farm))}


def admin(slapd: LocalSlapd) -> ldap3.Connection:
    return ldap3.Connection(
        ldap3.Server(slapd.url), user=slapd.admin_dn, password=slapd.admin_password, auto_bind=True
    )


def delete_container_as_admin(farm: TestFarm, slapd: LocalSlapd) -> None:
    """The disaster: the farm's whole DKM container is deleted from the directory."""
    container = f"cn={group_of(farm)},{slapd.container}"
    with admin(slapd) as conn:
        conn.search(container, "(objectClass=*)", ldap3.LEVEL, attributes=[ldap3.NO_ATTRIBUTES])
        for entry in list(conn.entries):
            assert conn.delete(entry.entry_dn), conn.result
        assert conn.delete(container), conn.result


def installed(farm: TestFarm, node: str) -> list[str]:
    manifest = json.loads((farm.store(node) / "manifest.json").read_text())
    return sorted(c["thumbprint"] for c in manifest["certificates"])


def export(farm: TestFarm, tmp_path: Path, name: str = "farm.escrow") -> Path:
    out = tmp_path / name
    result = farm.run(
        "escrow", "export", "--out", str(out), "--passphrase-file", passphrase_file(tmp_path)
    )
    expect_ok(result)
    return out


def test_the_disaster_drill_export_lose_the_container_import_and_a_fresh_node_syncs(
    initialised_farm: TestFarm, slapd: LocalSlapd, tmp_path: Path
) -> None:
    # Two keys: the farm has rolled its master key once (the previous one is still kept).
    expect_ok(initialised_farm.run("rollover", "--master-key"))
    expect_ok(initialised_farm.run("sync", node="node-a"))
    before = installed(initialised_farm, "node-a")
    keys = directory_keys(initialised_farm)
    assert len(keys) == 2

    out = export(initialised_farm, tmp_path)
    assert out.read_bytes().startswith(b"age-encryption.org/v1\n-> scrypt ")
    assert (out.stat().st_mode & 0o777) == 0o600
    delete_container_as_admin(initialised_farm, slapd)
    lost = initialised_farm.run("sync", node="node-b")
    assert lost.code == 1 and "missing from the directory" in one_error_line(lost)
    down = initialised_farm.run("status", "--json").json
    assert down["health"] == "critical"
    assert any("no live certificate can be opened" in p for p in down["problems"])

    result = initialised_farm.run(
        "escrow", "import", str(out), "--passphrase-file", passphrase_file(tmp_path)
    )
    expect_ok(result)
    assert "re-created the DKM container" in result.out
    assert directory_keys(initialised_farm) == keys  # the same ids, and the same one current
    expect_ok(initialised_farm.run("sync", node="node-b"))
    assert installed(initialised_farm, "node-b") == before
    # The service account alone reads them, as before: the parent's access rule covers it.
    config = load(initialised_farm.config())
    with Directory(config.directory, config.retry) as service:
        assert not service.anonymous_can_read(group_of(initialised_farm))
    actions = [e["action"] for e in audit_events(initialised_farm)]
    assert actions[-2:] == ["escrow_export", "escrow_import"]
    # Importing again changes nothing and says so.
    again = initialised_farm.run(
        "escrow", "import", str(out), "--passphrase-file", passphrase_file(tmp_path)
    )
    expect_ok(again)
    assert again.out.count("was already in the directory") == 2


def test_an_escrow_file_is_an_age_file_holding_the_farm_and_its_keys(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    out = export(initialised_farm, tmp_path)
    document = EscrowDocument.from_json(
        escrow_file.decrypt(out.read_bytes(), PASSPHRASE.encode()), source=str(out)
    )
    config = load(initialised_farm.config())
    with Directory(config.directory, config.retry) as service:
        [only] = service.list_keys(group_of(initialised_farm))
        key = service.master_key(group_of(initialised_farm), only.id)
    assert (document.farm, document.dkm_group) == ("contoso", group_of(initialised_farm))
    assert [(k.id, k.current, k.key) for k in document.keys] == [(only.id, True, key)]
    assert PASSPHRASE not in " ".join(str(e) for e in audit_events(initialised_farm))


def test_a_key_the_farm_deleted_is_never_brought_back(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    old = next(iter(directory_keys(initialised_farm)))
    out = export(initialised_farm, tmp_path)
    expect_ok(
        initialised_farm.run("rollover", "--master-key", "--urgent", "--yes")
    )  # old is shredded
    result = initialised_farm.run(
        "escrow", "import", str(out), "--passphrase-file", passphrase_file(tmp_path)
    )
    expect_ok(result)
    assert f"master key {old} not restored: the farm deleted it" in result.out
    assert old not in directory_keys(initialised_farm)


def test_a_shredded_key_stays_shredded_whatever_the_master_key_table_says(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    # The tombstone is in the authenticated farm state record; a config DB writer who
    # marks the shredded key as merely replaced cannot get it restored.
    old = next(iter(directory_keys(initialised_farm)))
    out = export(initialised_farm, tmp_path)
    expect_ok(
        initialised_farm.run("rollover", "--master-key", "--urgent", "--yes")
    )  # old is shredded
    record = db_query(initialised_farm.dsn, "SELECT body FROM farm_state")[0]["body"]
    assert str(old) in json.loads(bytes(record))["shredded"]
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute(
            "UPDATE master_key SET state = 'previous', deleted_at = NULL WHERE id = %s", (old,)
        )
    result = initialised_farm.run(
        "escrow", "import", str(out), "--passphrase-file", passphrase_file(tmp_path)
    )
    expect_ok(result)
    assert f"master key {old} not restored: the farm deleted it" in result.out
    assert old not in directory_keys(initialised_farm)


def test_escrow_import_refuses_when_no_farm_state_record_verifies(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    out = export(initialised_farm, tmp_path)
    with psycopg.connect(initialised_farm.dsn) as conn:
        conn.execute("UPDATE farm_state SET mac = decode(repeat('00', 32), 'hex')")
    before = directory_keys(initialised_farm)
    result = initialised_farm.run(
        "escrow", "import", str(out), "--passphrase-file", passphrase_file(tmp_path)
    )
    assert result.code == 1
    assert "lists the master keys the farm shredded, cannot be verified" in one_error_line(result)
    assert directory_keys(initialised_farm) == before


def test_a_key_in_the_directory_with_other_bytes_is_never_overwritten(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    [(key_id, _)] = directory_keys(initialised_farm).items()
    forged = EscrowDocument(
        farm="contoso",
        dkm_group=group_of(initialised_farm),
        exported_at=db_query(initialised_farm.dsn, "SELECT now() AS t")[0]["t"],
        keys=(EscrowedKey(id=key_id, created_at=None, current=True, key=os.urandom(32)),),
    )
    path = tmp_path / "forged.escrow"
    path.write_bytes(escrow_file.encrypt(forged.to_json(), PASSPHRASE.encode(), work_factor=10))
    events = len(audit_events(initialised_farm))
    result = initialised_farm.run(
        "escrow", "import", str(path), "--passphrase-file", passphrase_file(tmp_path)
    )
    assert result.code == 1
    assert f"master key {key_id} exists in the directory with other bytes" in one_error_line(result)
    assert len(audit_events(initialised_farm)) == events
    expect_ok(initialised_farm.run("sync"))  # the genuine key still opens the farm's blobs


@pytest.fixture
def other_farm(tmp_path: Path, slapd: LocalSlapd, postgres: object) -> TestFarm:
    from farmkeys_lab.postgres import LocalPostgres

    assert isinstance(postgres, LocalPostgres)
    name = f"other_{uuid.uuid4().hex[:8]}"
    postgres.create_database(name)
    farm = TestFarm(
        root=tmp_path / "other", slapd=slapd, dsn=postgres.dsn_for(name), name="fabrikam"
    )
    farm.root.mkdir()
    expect_ok(farm.run("init"))
    return farm


def test_bad_escrow_input_is_one_clear_line_and_changes_nothing(
    initialised_farm: TestFarm, other_farm: TestFarm, slapd: LocalSlapd, tmp_path: Path
) -> None:
    good = export(initialised_farm, tmp_path)
    foreign = export(other_farm, tmp_path, "other.escrow")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.escrow"
    truncated.write_bytes(data[:-20])
    tampered = tmp_path / "tampered.escrow"
    tampered.write_bytes(data[:-5] + bytes([data[-5] ^ 1]) + data[-4:])
    empty = passphrase_file(tmp_path, "")
    readable = passphrase_file(tmp_path, mode=0o640)
    wrong = passphrase_file(tmp_path, "not the passphrase at all")
    delete_container_as_admin(initialised_farm, slapd)  # so that any import would show
    events = len(audit_events(initialised_farm))

    cases = [
        (("import", str(good), "--passphrase-file", empty), "is empty"),
        (("import", str(good), "--passphrase-file", readable), "may be read or written by group"),
        (("import", str(truncated), "--passphrase-file", passphrase_file(tmp_path)), "damaged"),
        (("import", str(tampered), "--passphrase-file", passphrase_file(tmp_path)), "damaged"),
        (("import", str(good), "--passphrase-file", wrong), "wrong passphrase"),
        (
            ("import", str(foreign), "--passphrase-file", passphrase_file(tmp_path)),
            "not of this farm",
        ),
        (
            ("export", "--out", str(good), "--passphrase-file", passphrase_file(tmp_path)),
            "already exists",
        ),
        (
            (
                "export",
                "--out",
                str(tmp_path / "x"),
                "--passphrase-file",
                passphrase_file(tmp_path, "short"),
            ),
            "fewer than 12",
        ),
    ]
    for args, expected in cases:
        result = initialised_farm.run("escrow", *args)
        assert result.code == 1, (args, result.out, result.err)
        line = one_error_line(result)
        assert expected in line, (args, line)
        assert PASSPHRASE not in result.err
    assert directory_keys(initialised_farm) == {}
    assert len(audit_events(initialised_farm)) == events
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_without_a_passphrase_file_and_no_terminal_the_command_says_what_to_do(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    result = initialised_farm.spawn("escrow", "export", "--out", str(tmp_path / "x.escrow"))
    assert result.code == 1
    assert "no terminal to ask for the escrow passphrase" in one_error_line(result)
    assert "--passphrase" not in initialised_farm.spawn("escrow", "export", "--help").out.replace(
        "--passphrase-file", ""
    )


def test_export_asks_for_the_passphrase_twice_on_the_terminal(
    initialised_farm: TestFarm, tmp_path: Path
) -> None:
    out = tmp_path / "tty.escrow"
    env = clean_env()
    pid, fd = pty.fork()
    if pid == 0:  # the child: farmkeys on a terminal
        os.chdir(REPO)
        os.execve(
            sys.executable,
            [
                sys.executable,
                "-m",
                "farmkeys",
                "escrow",
                "export",
                "--out",
                str(out),
                "--config",
                str(initialised_farm.config()),
            ],
            env,
        )
    transcript = b""
    try:
        for prompt in (b"Escrow passphrase: ", b"again: "):
            transcript = _read_until(fd, transcript, prompt)
            os.write(fd, PASSPHRASE.encode() + b"\n")
        transcript = _read_until(fd, transcript, b"keep the file and the passphrase apart")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, transcript
    assert PASSPHRASE.encode() not in transcript  # not echoed
    assert escrow_file.decrypt(out.read_bytes(), PASSPHRASE.encode())


def _read_until(fd: int, seen: bytes, wanted: bytes, timeout: float = 60.0) -> bytes:
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"waited {timeout} s for {wanted!r}; the terminal showed {seen!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            assert chunk, f"the terminal closed before {wanted!r}; it showed {seen!r}"
            seen += chunk
    return seen


def test_the_config_db_holds_no_key_bytes_after_an_export_and_import(
    initialised_farm: TestFarm, slapd: LocalSlapd, tmp_path: Path
) -> None:
    import base64

    out = export(initialised_farm, tmp_path)
    delete_container_as_admin(initialised_farm, slapd)
    imported = initialised_farm.run(
        "escrow", "import", str(out), "--passphrase-file", passphrase_file(tmp_path)
    )
    expect_ok(imported)
    config = load(initialised_farm.config())
    with Directory(config.directory, config.retry) as service:
        [key_id] = directory_keys(initialised_farm)
        key = service.master_key(group_of(initialised_farm), key_id)
    tables = [
        r["t"]
        for r in db_query(
            initialised_farm.dsn, "SELECT tablename AS t FROM pg_tables WHERE schemaname = 'public'"
        )
    ]
    text = "".join(
        str(row["r"])
        for table in tables
        for row in db_query(initialised_farm.dsn, f"SELECT t::text AS r FROM {table} t")
    )
    assert "escrow_import" in text  # the dump is real
    for shown in (key.hex(), base64.b64encode(key).decode()):
        assert shown not in text
