"""`farmkeys check`: each thing it checks, found good, and found wrong the way operators get
it wrong (a wrong LDAP password, a 0644 password file, the wrong farm.name, ...), on the
session's real PostgreSQL and slapd. A `sync` with nothing to do passes all of these.
"""

from __future__ import annotations

import json
import secrets
import stat
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from farmtools import TestFarm, expect_ok, run_cli
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from farmkeys import check, config
from farmkeys.db import ConfigDB
from farmkeys.db.preflight import FARMKEYS_TABLES
from farmkeys.directory import Directory
from farmkeys.store import Store
from farmkeys_lab.postgres import LocalPostgres


@pytest.fixture
def synced(initialised_farm: TestFarm) -> TestFarm:
    expect_ok(initialised_farm.run("sync"))
    return initialised_farm


def node_role(
    postgres: LocalPostgres, farm: TestFarm, *, grant: bool, sequences: bool = True
) -> tuple[str, str]:
    """A login role for the farm's database (all four privileges on every farmkeys table
    when ``grant``); its name and DSN."""
    name = f"farmkeys_node_{uuid.uuid4().hex[:8]}"
    password = secrets.token_hex(16)
    dbname = str(conninfo_to_dict(farm.dsn)["dbname"])
    with psycopg.connect(farm.dsn, autocommit=True) as admin:
        ident = sql.Identifier(name)
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(ident, sql.Literal(password))
        )
        admin.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(ident))
        tables = FARMKEYS_TABLES if grant else ("farm", "farmkeys_migration")
        for table in tables:
            admin.execute(
                sql.SQL("GRANT {} ON {} TO {}").format(
                    sql.SQL("SELECT, INSERT, UPDATE, DELETE" if grant else "SELECT"),
                    sql.Identifier(table),
                    ident,
                )
            )
        admin.execute(sql.SQL("GRANT SELECT ON farmkeys_migration TO {}").format(ident))
        if sequences:
            admin.execute(
                sql.SQL("GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {}").format(ident)
            )
    return name, make_conninfo(postgres.dsn_for(dbname, user=name), password=password)


@pytest.fixture
def roles(postgres: LocalPostgres, synced: TestFarm) -> Iterator[dict[str, tuple[str, str]]]:
    made = {
        "node": node_role(postgres, synced, grant=True),
        "reader": node_role(postgres, synced, grant=False),
        "no sequences": node_role(postgres, synced, grant=True, sequences=False),
    }
    yield made
    with psycopg.connect(synced.dsn, autocommit=True) as admin:
        for name, _ in made.values():
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def checks(target: TestFarm, **sections: dict[str, Any]) -> tuple[int, dict[str, dict[str, str]]]:
    """`farmkeys check --json`: its exit code and its checks by name."""
    result = target.run("check", "--json", **sections)
    doc = json.loads(result.out)
    assert doc["result"] == {0: "ok", 1: "warning", 2: "failed"}[result.code], result
    return result.code, {c["name"]: c for c in doc["checks"]}


def test_a_well_made_node_passes_every_check(
    synced: TestFarm, roles: dict[str, tuple[str, str]]
) -> None:
    hook = synced.root / "reload.sh"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    code, found = checks(
        synced,
        database={"dsn": roles["node"][1]},
        hooks={"on_change": str(hook)},
        publish={
            "listen": "127.0.0.1:9464",
            "entity_id": "https://fs.contoso.example/adfs/services/trust",
            "sso_url": "https://fs.contoso.example/adfs/ls/",
        },
    )
    assert code == 0, found
    assert set(found) >= {
        "config file",
        "directory.password_file",
        "store folders",
        "config DB",
        "farm name",
        "DB privileges",
        "clock",
        "directory",
        "live blob",
        "store",
        "hook",
        "publish",
    }
    assert all(c["result"] == "ok" for c in found.values()), found
    assert "read the current master key" in found["directory"]["detail"]
    assert "opened the signing primary" in found["live blob"]["detail"]
    # Text: one line per check, each saying ok.
    text = synced.run("check", database={"dsn": roles["node"][1]})
    assert text.code == 0 and all(line.startswith("ok ") for line in text.out.splitlines())


def test_a_wrong_directory_password_fails_though_sync_has_nothing_to_do(synced: TestFarm) -> None:
    wrong = {"password": "not-the-password", "password_file": None}
    expect_ok(synced.run("sync", directory=wrong))  # "already in sync": it never binds
    code, found = checks(synced, directory=wrong)
    assert code == 2
    assert found["directory"]["result"] == "failed"
    assert "rejected the bind" in found["directory"]["detail"]
    assert found["live blob"]["result"] == "failed"


def test_a_password_file_others_may_read_fails(
    synced: TestFarm, capsys: pytest.CaptureFixture[str]
) -> None:
    path = synced.config()  # written once: farm.run would write it and the password anew
    password_file = synced.root / "directory.password"
    password_file.chmod(0o644)
    assert run_cli("sync", "--config", str(path), capsys=capsys).code == 0  # never read
    result = run_cli("check", "--json", "--config", str(path), capsys=capsys)
    assert result.code == 2
    found = {c["name"]: c for c in json.loads(result.out)["checks"]}
    assert found["directory.password_file"]["result"] == "failed"
    assert "chmod 600" in found["directory.password_file"]["fix"]


def test_the_wrong_farm_name_fails(synced: TestFarm) -> None:
    code, found = checks(synced, farm={"name": "fabrikam"})
    assert code == 2
    assert found["farm name"]["result"] == "failed"
    assert "'contoso'" in found["farm name"]["detail"]
    assert "'fabrikam'" in found["farm name"]["detail"]


def test_a_role_without_the_privileges_a_node_needs_fails_and_a_superuser_is_a_warning(
    synced: TestFarm, roles: dict[str, tuple[str, str]]
) -> None:
    code, found = checks(synced, database={"dsn": roles["reader"][1]})
    assert code == 2
    privileges = found["DB privileges"]
    assert privileges["result"] == "failed"
    assert "INSERT on certificate" in privileges["detail"]
    assert privileges["fix"].startswith("GRANT SELECT, INSERT, UPDATE, DELETE ON ")
    # All four on every table, but no USAGE on the sequences: no request could be filed.
    code, found = checks(synced, database={"dsn": roles["no sequences"][1]})
    assert code == 2
    assert "USAGE on rollover_request_id_seq" in found["DB privileges"]["detail"]
    assert "GRANT USAGE ON SEQUENCE " in found["DB privileges"]["fix"]
    assert "GRANT SELECT" not in found["DB privileges"]["fix"]
    _, found = checks(synced)  # the lab's own role: postgres
    assert found["DB privileges"]["result"] == "warning"
    assert "superuser" in found["DB privileges"]["detail"]


@pytest.mark.parametrize(("skew", "result"), [(10, "warning"), (-120, "failed"), (0, "ok")])
def test_the_clock_offset_to_the_config_db(synced: TestFarm, skew: int, result: str) -> None:
    cfg = config.load(synced.config())
    store = Store(cfg.store, node_id=cfg.node.id)
    with ConfigDB(cfg.database, cfg.retry) as db, Directory(cfg.directory, cfg.retry) as dirx:
        report = check.run(
            cfg,
            config_file=None,
            db=db,
            directory=dirx,
            store=store,
            now=lambda: datetime.now(UTC) - timedelta(seconds=skew),
        )
    (clock,) = [c for c in report.checks if c.name == "clock"]
    assert clock.result == result, clock
    if skew:
        assert ("behind" if skew > 0 else "ahead of") in clock.detail


def test_a_damaged_or_empty_store_and_a_missing_hook(synced: TestFarm) -> None:
    key = synced.store() / "signing" / "primary.key"
    key.write_bytes(key.read_bytes() + b"\n")
    code, found = checks(synced, hooks={"on_change": "/nonexistent/reload --now"})
    assert code == 2
    assert found["store"]["result"] == "failed"
    assert "no longer matches the store's manifest" in found["store"]["detail"]
    assert found["hook"]["result"] == "failed"
    assert "/nonexistent/reload" in found["hook"]["detail"]
    synced.overrides["node"] = {"store": str(synced.root / "fresh-store")}
    _, found = checks(synced)
    assert found["store"]["result"] == "warning"
    assert "nothing is installed" in found["store"]["detail"]


def test_a_hook_that_is_not_executable_or_that_others_may_write_fails(synced: TestFarm) -> None:
    hook = synced.root / "reload.sh"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o644)
    _, found = checks(synced, hooks={"on_change": str(hook)})
    assert found["hook"]["result"] == "failed" and f"chmod +x {hook}" == found["hook"]["fix"]
    hook.chmod(0o777)
    _, found = checks(synced, hooks={"on_change": str(hook)})
    assert found["hook"]["result"] == "failed"
    assert "writable by" in found["hook"]["detail"]


def test_publishing_without_the_metadata_settings_fails(synced: TestFarm) -> None:
    code, found = checks(synced, publish={"listen": "127.0.0.1:9464"})
    assert code == 2
    assert found["publish"]["result"] == "failed"
    assert "publish.entity_id" in found["publish"]["detail"]
    _, found = checks(
        synced,
        publish={
            "listen": "127.0.0.1:9464",
            "entity_id": "http://fs.example/adfs/services/trust",
            "sso_url": "https://fs.example/adfs/ls/",
        },
    )
    assert found["publish"]["result"] == "warning"


def test_a_config_file_others_may_write_is_the_one_failed_check(
    synced: TestFarm, capsys: pytest.CaptureFixture[str]
) -> None:
    path = synced.config()
    path.chmod(0o666)
    result = run_cli("check", "--config", str(path), capsys=capsys)
    assert result.code == 2
    (line,) = result.out.splitlines()
    assert line.startswith("failed   config "), line
    assert "chmod" in line
    assert stat.S_IMODE(path.stat().st_mode) == 0o666  # check changes nothing
    as_json = run_cli("check", "--json", "--config", str(path), capsys=capsys)
    assert json.loads(as_json.out)["result"] == "failed"


def test_check_writes_nothing(synced: TestFarm) -> None:
    def tables() -> list[Any]:
        with psycopg.connect(synced.dsn) as conn:
            return [
                conn.execute(f"SELECT to_jsonb(t) FROM {table} t ORDER BY 1::text").fetchall()
                for table in (
                    "node",
                    "audit_event",
                    "rollover_request",
                    "certificate",
                    "farm_state",
                )
            ]

    before = tables()
    store = sorted(str(p) for p in synced.store().rglob("*"))
    checks(synced)
    assert tables() == before
    assert sorted(str(p) for p in synced.store().rglob("*")) == store
