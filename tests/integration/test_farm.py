"""farmkeys end to end: init, sync on several nodes, status — against real PostgreSQL and slapd."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from farmtools import TestFarm, add_certificate, expect_ok, hold_lease, one_error_line, snapshot

from farmkeys.cli import commands
from farmkeys.config import load
from farmkeys.db import ConfigDB
from farmkeys.directory import Directory
from farmkeys.formats import blob as blob_format
from farmkeys.status import read_farm_status
from farmkeys.store import Store
from farmkeys.sync import sync
from farmkeys_lab.postgres import LocalPostgres
from farmkeys_lab.servers import free_port
from farmkeys_lab.slapd import LocalSlapd


def db_rows(dsn: str, query: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query).fetchall()


# -- init ---------------------------------------------------------------------------------


def test_init_creates_schema_directory_container_and_two_primaries(farm: TestFarm) -> None:
    result = farm.run("init")
    expect_ok(result)
    assert "applied migration 0001_initial.sql" in result.out
    assert "created farm 'contoso'" in result.out

    rows = db_rows(farm.dsn, "SELECT purpose, role, subject, key_type FROM certificate ORDER BY 1")
    assert rows == [
        ("decryption", "primary", "CN=contoso Token Decryption", "rsa-2048"),
        ("signing", "primary", "CN=contoso Token Signing", "rsa-2048"),
    ]
    (group,) = db_rows(farm.dsn, "SELECT dkm_group FROM farm")[0]
    versions = db_rows(farm.dsn, "SELECT version FROM farmkeys_migration ORDER BY 1")
    assert versions == [(1,), (2,), (3,), (4,), (5,), (6,), (7,), (8,), (9,), (10,), (11,)]

    cfg = load(farm.config())
    with Directory(cfg.directory, cfg.retry) as directory:
        keys = directory.list_keys(group)
    assert len(keys) == 1 and keys[0].current
    (named,) = db_rows(farm.dsn, "SELECT DISTINCT master_key FROM certificate")[0]
    assert named == keys[0].id


def test_init_twice_changes_nothing_and_says_so(initialised_farm: TestFarm) -> None:
    farm = initialised_farm
    before = db_rows(farm.dsn, "SELECT id, role, thumbprint, blob FROM certificate ORDER BY id")
    group_before = db_rows(farm.dsn, "SELECT dkm_group FROM farm")
    result = farm.run("init")
    expect_ok(result)
    assert "already initialised" in result.out and "nothing changed" in result.out
    assert (
        db_rows(farm.dsn, "SELECT id, role, thumbprint, blob FROM certificate ORDER BY id")
        == before
    )
    assert db_rows(farm.dsn, "SELECT dkm_group FROM farm") == group_before


def test_init_with_another_farm_name_is_refused(initialised_farm: TestFarm) -> None:
    initialised_farm.name = "fabrikam"
    result = initialised_farm.run("init")
    assert result.code == 1
    assert "already holds farm 'contoso', not 'fabrikam'" in one_error_line(result)


def test_db_upgrade_applies_only_new_migrations(farm: TestFarm) -> None:
    first = farm.run("db", "upgrade")
    expect_ok(first)
    assert "applied migration 0001_initial.sql" in first.out
    again = farm.run("db", "upgrade")
    expect_ok(again)
    assert "up to date; nothing changed" in again.out


@pytest.mark.parametrize(
    ("policy", "signing", "decryption"),
    [
        ({"key": "rsa-3072"}, "rsa-3072", "rsa-3072"),
        # Relying parties encrypt tokens to RSA keys: an EC policy is for signing only.
        ({"key": "ec-p256"}, "ec-p256", "rsa-2048"),
        ({"key": "ec-p256", "decryption_key": "rsa-4096"}, "ec-p256", "rsa-4096"),
    ],
)
def test_init_honours_the_key_type_policy(
    farm: TestFarm, policy: dict[str, str], signing: str, decryption: str
) -> None:
    expect_ok(farm.run("init", policy=policy))
    rows = db_rows(farm.dsn, "SELECT purpose, key_type FROM certificate ORDER BY 1")
    assert rows == [("decryption", decryption), ("signing", signing)]
    expect_ok(farm.run("sync", policy=policy))


def test_a_decryption_key_that_is_not_rsa_is_refused(farm: TestFarm) -> None:
    result = farm.run("init", policy={"decryption_key": "ec-p256"})
    assert result.code != 0
    assert "token decryption needs RSA" in one_error_line(result)


def test_new_certificates_are_valid_from_an_hour_before_they_are_made(
    initialised_farm: TestFarm,
) -> None:
    # A relying party whose clock is slow still accepts a just-promoted certificate; the
    # end, which the rollover schedule counts from, is a full duration after it was made.
    # Both ends come from the one moment the certificate was made (to the second), so
    # they are exactly an hour and a duration apart; that moment precedes the row's
    # insert by what `init` does first (the directory's container, the key): 1.05 s was
    # seen on 2 cores at a load average of 68, so the margin is a minute. An allowance
    # of two hours, or of none, still fails.
    for not_before, not_after, created in db_rows(
        initialised_farm.dsn, "SELECT not_before, not_after, created_at FROM certificate"
    ):
        made = not_before + timedelta(hours=1)
        assert not_after - made == timedelta(days=365)
        assert timedelta(0) <= created - made <= timedelta(seconds=60)


def test_init_warns_when_an_anonymous_bind_can_read_the_container(
    tmp_path: Path, pg_dsn: str
) -> None:
    with LocalSlapd(tmp_path / "open-slapd", anonymous_read_dkm=True) as open_slapd:
        farm = TestFarm(root=tmp_path, slapd=open_slapd, dsn=pg_dsn)
        result = farm.run("init")
    expect_ok(result)
    assert "warning: an anonymous bind can read the DKM container" in result.err


def test_init_without_directory_rights_leaves_no_farm(farm: TestFarm) -> None:
    result = farm.run(
        "init",
        directory=farm.other_account(),
    )
    assert result.code == 1
    line = one_error_line(result)
    assert "may not create entries" in line and farm.slapd.other_dn in line
    assert farm.slapd.other_password not in result.err
    assert db_rows(farm.dsn, "SELECT count(*) FROM farm") == [(0,)]


# -- sync -----------------------------------------------------------------------------------


def test_three_nodes_sync_the_same_certificates(initialised_farm: TestFarm) -> None:
    farm = initialised_farm
    for node in ("node-a", "node-b", "node-c"):
        result = farm.run("sync", node=node)
        expect_ok(result)
        assert f"{node}: installed generation 1" in result.out

    manifests = [
        json.loads((farm.store(n) / "manifest.json").read_text())
        for n in ("node-a", "node-b", "node-c")
    ]
    sets = [
        {(c["purpose"], c["role"], c["thumbprint"]) for c in m["certificates"]} for m in manifests
    ]
    assert sets[0] == sets[1] == sets[2]
    expected = set(db_rows(farm.dsn, "SELECT purpose, role, thumbprint FROM certificate"))
    assert sets[0] == expected
    assert [m["node"] for m in manifests] == ["node-a", "node-b", "node-c"]

    hold_lease(farm)
    status = farm.run("status", "--json")
    expect_ok(status)
    doc = status.json
    assert doc["health"] == "ok" and doc["problems"] == []
    assert [n["id"] for n in doc["nodes"]] == ["node-a", "node-b", "node-c"]
    assert all(n["in_sync"] for n in doc["nodes"])


def test_store_layout_and_permissions(initialised_farm: TestFarm) -> None:
    farm = initialised_farm
    expect_ok(farm.run("sync"))
    store = farm.store()
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    manifest = json.loads((store / "manifest.json").read_text())
    assert set(manifest) >= {"node", "generation", "installed_at", "certificates"}
    for entry in manifest["certificates"]:
        purpose, thumb = entry["purpose"], entry["thumbprint"]
        assert entry["files"] == {
            "cert": f"{purpose}/{thumb}.pem",
            "key": f"{purpose}/{thumb}.key",
            "pkcs12": f"{purpose}/{thumb}.p12",
        }
        for suffix in ("key", "p12"):
            for name in (thumb, "primary"):
                mode = stat.S_IMODE((store / purpose / f"{name}.{suffix}").stat().st_mode)
                assert mode == 0o600, (name, suffix, oct(mode))
        assert (store / purpose / "primary.pem").read_bytes() == (
            store / purpose / f"{thumb}.pem"
        ).read_bytes()
        # The .p12 has no password and opens with the openssl command line.
        out = subprocess.run(
            [
                "openssl",
                "pkcs12",
                "-in",
                str(store / purpose / "primary.p12"),
                "-passin",
                "pass:",
                "-nodes",
                "-nokeys",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "BEGIN CERTIFICATE" in out


def test_second_sync_changes_nothing_and_reads_no_key(initialised_farm: TestFarm) -> None:
    farm = initialised_farm
    expect_ok(farm.run("sync"))
    before = snapshot(farm.store())
    again = farm.run("sync")
    expect_ok(again)
    assert "already in sync at generation 1" in again.out
    assert snapshot(farm.store()) == before


def test_sync_costs_one_query_and_one_directory_read_per_key_whatever_the_history(
    initialised_farm: TestFarm,
) -> None:
    farm = initialised_farm
    # Forty archived certificates sealed under a master key that no longer exists:
    # if sync read any of them, it would fail.
    with psycopg.connect(farm.dsn) as conn:
        conn.execute(
            "INSERT INTO certificate (id, purpose, role, thumbprint, sha256, subject, key_type,"
            " not_before, not_after, der, master_key, blob)"
            " SELECT gen_random_uuid(), c.purpose, 'archived',"
            "  upper(substr(md5(random()::text) || md5(random()::text), 1, 40)),"
            "  upper(md5(random()::text) || md5(random()::text)), c.subject, c.key_type,"
            "  c.not_before - interval '2 years', c.not_after - interval '2 years', c.der,"
            "  gen_random_uuid(), c.blob"
            " FROM certificate c, generate_series(1, 20)"
        )
    cfg = load(farm.config())
    store = Store(cfg.store, node_id=cfg.node.id)
    from datetime import UTC, datetime

    with ConfigDB(cfg.database, cfg.retry) as db, Directory(cfg.directory, cfg.retry) as directory:
        sync(cfg, db, directory, store, now=datetime.now(UTC))
        assert directory.key_reads == 1
        first = db.statements
        assert first == 2  # the live set, then the report of what was installed
        # The store changes under us (another process wiped it): reinstall, no new key read.
        (farm.store() / "current").unlink()
        sync(cfg, db, directory, store, now=datetime.now(UTC))
        assert directory.key_reads == 1
        assert db.statements - first == 2


def test_sync_before_init_fails_and_touches_nothing(farm: TestFarm) -> None:
    result = farm.run("sync")
    assert result.code == 1
    assert "holds no farmkeys farm" in one_error_line(result)
    assert "farmkeys init" in result.err
    assert not farm.store().exists()


def corrupt_and_sync(farm: TestFarm, update: str) -> str:
    """Sync, add a real secondary (so the store must change), corrupt a blob, sync again."""
    expect_ok(farm.run("sync"))
    before = snapshot(farm.store())
    add_certificate(farm, purpose="signing", role="secondary")
    with psycopg.connect(farm.dsn) as conn:
        conn.execute(update)
    result = farm.run("sync")
    assert result.code == 1
    assert snapshot(farm.store()) == before
    return one_error_line(result)


def test_blob_with_one_byte_flipped_fails_and_the_store_is_kept(initialised_farm: TestFarm) -> None:
    line = corrupt_and_sync(
        initialised_farm,
        "UPDATE certificate SET blob = overlay(blob placing"
        " decode(lpad(to_hex(get_byte(blob, 60) # 1), 2, '0'), 'hex') from 61 for 1)"
        " WHERE role = 'secondary'",
    )
    assert "signing certificate" in line and "not authentic" in line


def test_blob_copied_into_another_row_fails(initialised_farm: TestFarm) -> None:
    line = corrupt_and_sync(
        initialised_farm,
        # The node must install the new secondary: the primary's blob in its row does not open.
        "UPDATE certificate SET blob = (SELECT blob FROM certificate WHERE role = 'primary'"
        " AND purpose = 'signing') WHERE role = 'secondary'",
    )
    assert "signing certificate" in line and "not authentic" in line


def test_blob_whose_master_key_is_missing_fails_naming_the_key(initialised_farm: TestFarm) -> None:
    farm = initialised_farm
    cfg = load(farm.config())
    (group,) = db_rows(farm.dsn, "SELECT dkm_group FROM farm")[0]
    missing = uuid.uuid4()
    with Directory(cfg.directory, cfg.retry) as directory:
        key = directory.master_key(group, directory.current_key_id(group))
    (cert_id, blob) = db_rows(
        farm.dsn, "SELECT id, blob FROM certificate WHERE purpose = 'signing'"
    )[0]
    context = blob_format.BlobContext(
        farm=str(group), certificate_id=str(cert_id), purpose="signing"
    )
    plain = blob_format.open_blob(bytes(blob), master_key=key, context=context)
    resealed = blob_format.seal(plain, master_key=bytes(32), master_key_id=missing, context=context)
    expect_ok(farm.run("sync"))
    before = snapshot(farm.store())
    with psycopg.connect(farm.dsn) as conn:
        conn.execute(
            "UPDATE certificate SET blob = %s, master_key = %s WHERE id = %s",
            (resealed, missing, cert_id),
        )
    add_certificate(farm, purpose="decryption", role="secondary")  # node-a must reinstall

    # node-a holds the signing certificate intact: it carries it into the new generation
    # without opening its blob, and only cannot confirm the missing key.
    result = farm.run("sync")
    expect_ok(result)
    assert snapshot(farm.store()) != before
    (confirmed,) = db_rows(farm.dsn, "SELECT master_keys FROM node WHERE id = 'node-a'")[0]
    assert missing not in confirmed
    # A node that must install it fails, naming the key, and installs nothing.
    fresh = farm.run("sync", node="node-b")
    assert fresh.code == 1
    line = one_error_line(fresh)
    assert f"master key {missing}" in line and "missing from the directory" in line
    assert not (farm.store("node-b") / "manifest.json").exists()
    doc = farm.run("status", "--json").json
    assert any("node-b's last sync failed" in p for p in doc["problems"])


def test_a_write_failing_midway_leaves_the_store_as_it_was(initialised_farm: TestFarm) -> None:
    import resource
    import signal

    farm = initialised_farm
    expect_ok(farm.run("sync"))
    before = snapshot(farm.store())
    add_certificate(farm, purpose="signing", role="secondary")

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))

    result = farm.spawn("sync", preexec=small_files)
    assert result.code == 1, result.err
    line = one_error_line(result)
    assert str(farm.store()) in line and "left as they were" in line
    assert snapshot(farm.store()) == before
    expect_ok(farm.run("sync"))  # and once the limit is gone, the sync goes through


# -- status -------------------------------------------------------------------------------


def test_status_json_has_every_documented_field(initialised_farm: TestFarm) -> None:
    farm = initialised_farm
    expect_ok(farm.run("sync"))
    term = hold_lease(farm)
    doc = farm.run("status", "--json").json
    assert set(doc["farm"]) >= {"name", "dkm_group"}
    assert doc["leader"]["node"] == "node-a"
    assert doc["leader"]["term"] == term
    assert doc["leader"]["expires_at"].endswith("+00:00")
    assert doc["farm"]["name"] == "contoso"
    assert doc["health"] == "ok"
    for cert in doc["certificates"]:
        assert set(cert) >= {
            "id",
            "purpose",
            "role",
            "thumbprint",
            "sha256",
            "not_before",
            "not_after",
            "master_key",
        }
        assert len(cert["thumbprint"]) == 40 and cert["thumbprint"] == cert["thumbprint"].upper()
        assert cert["next_action"]["action"] == "generate_secondary"
        assert cert["next_action"]["at"] < cert["not_after"]
        assert cert["not_after"].endswith("+00:00")
    (key,) = doc["master_keys"]
    assert key["current"] is True and key["created_at"]
    (node,) = doc["nodes"]
    assert node["in_sync"] and len(node["installed"]) == 2 and node["last_sync"]


def test_status_for_a_person_shows_the_farm(initialised_farm: TestFarm) -> None:
    farm = initialised_farm
    expect_ok(farm.run("sync"))
    hold_lease(farm)
    result = farm.run("status")
    expect_ok(result)
    assert "farm      contoso" in result.out and "health    OK" in result.out
    assert "node-a" in result.out and "in sync" in result.out
    assert "leader    node-a (term 1" in result.out
    assert "next: generate_secondary at" in result.out


def test_status_warns_when_no_node_holds_the_lease(initialised_farm: TestFarm) -> None:
    farm = initialised_farm
    expect_ok(farm.run("sync"))
    result = farm.run("status", "--json")
    assert result.code == 1
    assert result.json["leader"] is None
    assert any("no node holds the leader lease" in p for p in result.json["problems"])


def test_status_warns_when_a_node_has_not_installed_the_live_set(
    initialised_farm: TestFarm,
) -> None:
    farm = initialised_farm
    expect_ok(farm.run("sync"))
    with psycopg.connect(farm.dsn) as conn:
        conn.execute("UPDATE certificate SET role = 'archived' WHERE purpose = 'signing'")
    add_certificate(farm, purpose="signing", role="primary")
    result = farm.run("status", "--json")
    assert result.code == 1
    assert "node node-a has not installed the live certificate set" in result.json["problems"]


def test_status_is_critical_inside_the_critical_threshold(
    initialised_farm: TestFarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime, timedelta

    farm = initialised_farm
    expect_ok(farm.run("sync"))
    monkeypatch.setattr(commands, "_now", lambda: datetime.now(UTC) + timedelta(days=364))
    result = farm.run("status", "--json")
    assert result.code == 2
    assert result.json["health"] == "critical"
    assert any("inside the critical threshold" in p for p in result.json["problems"])
    cfg = load(farm.config())
    with ConfigDB(cfg.database, cfg.retry) as db:
        warn = read_farm_status(cfg, db, None, now=datetime.now(UTC) + timedelta(days=350))
    assert warn.health == "warning"
    assert any("has no secondary yet" in p for p in warn.problems)


def test_status_exits_3_when_the_config_db_is_unreachable(initialised_farm: TestFarm) -> None:
    result = initialised_farm.run("status", database={"dsn": "postgresql://postgres@127.0.0.1:1/x"})
    assert result.code == 3
    line = one_error_line(result)
    assert "cannot reach the config DB at 127.0.0.1:1/x as postgres" in line
    assert "attempts" in line


def test_status_with_the_directory_down_still_reports_the_farm(initialised_farm: TestFarm) -> None:
    farm = initialised_farm
    expect_ok(farm.run("sync"))
    result = farm.run("status", "--json", directory={"url": "ldap://127.0.0.1:1"})
    assert result.code == 1
    doc = result.json
    assert any("cannot list master keys" in p for p in doc["problems"])
    # The farm's own record still says which key is current; whether the directory
    # holds it cannot be told.
    [key] = doc["master_keys"]
    assert (key["current"], key["state"], key["in_directory"]) == (True, "current", None)


# -- events ---------------------------------------------------------------------------------


def test_events_show_what_init_did(initialised_farm: TestFarm) -> None:
    farm = initialised_farm
    events = farm.run("events", "--json")
    expect_ok(events)
    actions = [(e["action"], e["purpose"], e["term"], e["node"]) for e in events.json]
    assert actions == [
        ("init", None, None, "node-a"),
        ("generate_and_promote", "signing", None, "node-a"),
        ("generate_and_promote", "decryption", None, "node-a"),
    ]
    thumbprints = {t for (t,) in db_rows(farm.dsn, "SELECT thumbprint FROM certificate")}
    assert {e["thumbprint"] for e in events.json[1:]} == thumbprints
    assert all(e["at"].endswith("+00:00") for e in events.json)

    text = farm.run("events", "--since", "1h")
    expect_ok(text)
    assert "init" in text.out and "generate_and_promote signing" in text.out
    assert farm.run("events", "--since", "2099-01-01T00:00:00Z").out.strip() == "no events"


def test_events_since_must_be_a_time_or_an_age(initialised_farm: TestFarm) -> None:
    with pytest.raises(SystemExit) as done:
        initialised_farm.run("events", "--since", "yesterday")
    assert done.value.code == 64


def test_a_node_syncs_past_a_dead_directory_server_and_status_names_the_one_it_used(
    initialised_farm: TestFarm,
) -> None:
    dead = f"ldap://127.0.0.1:{free_port()}"
    servers = {"directory": {"url": [dead, initialised_farm.slapd.url]}}
    result = initialised_farm.run("sync", node="node-b", **servers)
    expect_ok(result)
    doc = initialised_farm.run("status", "--json").json
    nodes = {n["id"]: n for n in doc["nodes"]}
    assert nodes["node-b"]["directory_server"] == initialised_farm.slapd.url
    assert nodes["node-b"]["in_sync"]
    human = initialised_farm.run("status")
    assert f"directory {initialised_farm.slapd.url}" in human.out


def test_migrations_come_from_the_installed_package_not_a_folder_beside_it(
    tmp_path: Path,
) -> None:
    # As a wheel installs it: site/farmkeys/ with farmkeys/_sql/*.sql, and, beside it,
    # another package's sql/ folder. Only farmkeys' own migrations are ever read.
    import shutil

    from farmtools import REPO, run_python

    site = tmp_path / "site"
    shutil.copytree(REPO / "farmkeys", site / "farmkeys")
    shutil.copytree(REPO / "sql", site / "farmkeys" / "_sql")
    (site / "farmkeys" / "_sql" / "__init__.py").write_text("")
    (site / "sql").mkdir()
    (site / "sql" / "0001_someone_elses.sql").write_text("DROP TABLE everything;\n")
    result = run_python(
        "-c",
        f"import sys; sys.path.insert(0, {str(site)!r}); "
        "from farmkeys.db import migrations; "
        "print(' '.join(m.name for m in migrations()))",
    )
    expect_ok(result)
    assert result.out.split() == sorted(p.name for p in (REPO / "sql").glob("*.sql"))


# --- a node is bound to its farm (issue 9, part 2) -------------------------------------


@pytest.fixture
def other_farm(tmp_path: Path, slapd: LocalSlapd, postgres: LocalPostgres) -> Iterator[TestFarm]:
    """A second farm, on its own database, with its own DKM container in the same directory."""
    name = f"farmkeys_other_{uuid.uuid4().hex[:8]}"
    other = TestFarm(root=tmp_path / "other", slapd=slapd, dsn=postgres.create_database(name))
    other.root.mkdir()
    expect_ok(other.run("init"))
    try:
        yield other
    finally:
        postgres.drop_database(name)


def manifest_group(store: Path) -> str | None:
    return json.loads((store / "manifest.json").read_text()).get("dkm_group")


def group_of(farm: TestFarm) -> str:
    return str(db_rows(farm.dsn, "SELECT dkm_group FROM farm")[0][0])


def test_a_store_is_pinned_to_the_first_farm_it_installs(
    initialised_farm: TestFarm, other_farm: TestFarm
) -> None:
    expect_ok(initialised_farm.run("sync"))
    assert manifest_group(initialised_farm.store()) == group_of(initialised_farm)
    before = snapshot(initialised_farm.store())
    elsewhere = {"database": {"dsn": other_farm.dsn}}
    result = initialised_farm.run("sync", **elsewhere)
    assert result.code != 0
    line = one_error_line(result)
    assert group_of(other_farm) in line and group_of(initialised_farm) in line
    assert "first installed" in line
    assert snapshot(initialised_farm.store()) == before


def test_farm_dkm_group_pins_a_node_before_anything_is_installed(
    initialised_farm: TestFarm, other_farm: TestFarm
) -> None:
    pin = {"farm": {"name": "contoso", "dkm_group": group_of(initialised_farm)}}
    result = initialised_farm.run("sync", database={"dsn": other_farm.dsn}, **pin)
    assert result.code != 0
    assert "pinned by farm.dkm_group" in one_error_line(result)
    assert not initialised_farm.store().exists() or snapshot(initialised_farm.store()) == {}
    expect_ok(initialised_farm.run("sync", **pin))
    # A farm re-created on purpose: the operator names the new group, and the node follows.
    repin = {"farm": {"name": "contoso", "dkm_group": group_of(other_farm)}}
    expect_ok(initialised_farm.run("sync", database={"dsn": other_farm.dsn}, **repin))
    assert manifest_group(initialised_farm.store()) == group_of(other_farm)


def test_a_bad_farm_dkm_group_is_a_config_error(initialised_farm: TestFarm) -> None:
    result = initialised_farm.run("sync", farm={"name": "contoso", "dkm_group": "not-a-guid"})
    assert result.code != 0
    assert "farm.dkm_group 'not-a-guid' is not a GUID" in one_error_line(result)


def test_a_store_installed_before_pinning_is_pinned_when_next_in_sync(
    initialised_farm: TestFarm,
) -> None:
    expect_ok(initialised_farm.run("sync"))
    path = initialised_farm.store() / "manifest.json"
    document = json.loads(path.read_text())
    del document["dkm_group"]
    target = path.resolve()
    target.write_text(json.dumps(document))
    expect_ok(initialised_farm.run("sync"))
    assert manifest_group(initialised_farm.store()) == group_of(initialised_farm)


def test_sync_reinstalls_a_set_whose_key_file_was_changed(initialised_farm: TestFarm) -> None:
    expect_ok(initialised_farm.run("sync"))
    key = initialised_farm.store() / "signing" / "primary.key"
    good = key.read_bytes()
    key.resolve().write_bytes(good.replace(b"A", b"B", 1))
    result = initialised_farm.run("sync")
    expect_ok(result)
    assert key.read_bytes() == good
    assert json.loads((initialised_farm.store() / "manifest.json").read_text())["generation"] == 2


def test_sync_repairs_a_corrupt_manifest(initialised_farm: TestFarm) -> None:
    # Pinning reads the manifest before anything else: a corrupt one must still be
    # repaired by the install, as before farms were pinned, not stop every sync.
    expect_ok(initialised_farm.run("sync"))
    (initialised_farm.store() / "manifest.json").resolve().write_text('{"node": "node-a", "gen')
    result = initialised_farm.run("sync")
    expect_ok(result)
    document = json.loads((initialised_farm.store() / "manifest.json").read_text())
    assert document["generation"] == 2 and document["dkm_group"] == group_of(initialised_farm)


def test_sync_with_a_store_group_lets_that_group_read_the_keys(initialised_farm: TestFarm) -> None:
    import grp

    group = next(g for g in grp.getgrall() if g.gr_gid not in (0, os.getegid()))
    farm = initialised_farm
    farm.overrides["node"] = {"store_group": group.gr_name}
    expect_ok(farm.run("sync"))
    key = (farm.store() / "signing" / "primary.key").resolve()
    status = key.lstat()
    assert (stat.S_IMODE(status.st_mode), status.st_gid) == (0o640, group.gr_gid)
    # The config (it may hold a password) stays farmkeys' alone.
    assert stat.S_IMODE(farm.config().stat().st_mode) == 0o600
