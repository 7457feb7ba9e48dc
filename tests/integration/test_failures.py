"""Bad input and unreachable servers: one clear line, a non-zero exit, nothing changed.

A bad config file or command line, which fails before any server is asked, is in
tests/unit/test_cli_errors.py."""

from __future__ import annotations

import psycopg
import pytest
from farmtools import TestFarm, add_certificate, expect_ok, one_error_line, run_cli, snapshot


@pytest.fixture
def synced(farm: TestFarm) -> TestFarm:
    """An initialised farm whose node-a has synced, and a new secondary it has not seen yet.

    A sync of node-a must therefore open blobs and switch its store: the
    failures below would show in it.
    """
    expect_ok(farm.run("init"))
    expect_ok(farm.run("sync"))
    add_certificate(farm, purpose="signing", role="secondary")
    return farm


# -- configuration ----------------------------------------------------------------------


def test_bad_environment_override_is_one_line_and_exit_1(
    synced: TestFarm, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FARMKEYS_POLICY_CERTIFICATE_DURATION", "a year")
    result = run_cli("sync", "--config", str(synced.config()), capsys=capsys)
    assert result.code == 1
    assert "FARMKEYS_POLICY_CERTIFICATE_DURATION must be an integer" in one_error_line(result)


# -- the config DB --------------------------------------------------------------------------


def test_unreachable_config_db_is_retried_then_named(synced: TestFarm) -> None:
    before = snapshot(synced.store())
    result = synced.run("sync", database={"dsn": "postgresql://postgres@127.0.0.1:1/farm"})
    assert (
        result.code == 75
    )  # the installed set is kept (tests/integration/test_sync_exit_codes.py)
    (line,) = result.err.splitlines()
    assert line.startswith("farmkeys: warning: "), line
    assert "cannot reach the config DB at 127.0.0.1:1/farm as postgres after" in line
    assert "Connection refused" in line
    assert int(line.split(" after ")[1].split()[0]) > 1  # it was retried
    assert snapshot(synced.store()) == before


def test_config_db_refusing_the_login_is_not_retried(synced: TestFarm, pg_role: str) -> None:
    dbname = psycopg.conninfo.conninfo_to_dict(synced.dsn)["dbname"]
    dsn = psycopg.conninfo.make_conninfo(pg_role, dbname=str(dbname))
    before = snapshot(synced.store())
    result = synced.spawn("sync", database={"dsn": dsn})
    assert result.code == 1
    line = one_error_line(result)
    assert "refused the login" in line and "not permitted to log in" in line
    assert "retrying" not in result.err
    assert snapshot(synced.store()) == before


# -- the directory --------------------------------------------------------------------------


def test_unreachable_directory_is_retried_then_named(synced: TestFarm) -> None:
    before = snapshot(synced.store())
    result = synced.spawn("sync", directory={"url": "ldap://127.0.0.1:1"})
    assert (
        result.code == 75
    )  # the installed set is kept (tests/integration/test_sync_exit_codes.py)
    outage, kept = result.err.splitlines()  # one line for the outage, not one per attempt
    assert outage.startswith("farmkeys: warning: directory ldap://127.0.0.1:1 is unreachable: ")
    assert outage.endswith("; retrying for up to 1 s"), outage
    assert kept.startswith("farmkeys: warning: cannot reach the directory at ldap://127.0.0.1:1")
    assert "attempts over" in kept  # it was retried
    assert snapshot(synced.store()) == before


def test_wrong_directory_password_is_not_retried(synced: TestFarm) -> None:
    before = snapshot(synced.store())
    result = synced.spawn("sync", directory={"password": "not-the-password", "password_file": None})
    assert result.code == 1
    line = one_error_line(result)
    assert "rejected the bind" in line and synced.slapd.service_dn in line
    assert "retrying" not in result.err
    assert snapshot(synced.store()) == before


def test_directory_account_without_rights_cannot_sync(synced: TestFarm) -> None:
    before = snapshot(synced.store())
    result = synced.run(
        "sync",
        directory=synced.other_account(),
    )
    assert result.code == 1
    line = one_error_line(result)
    assert "missing from the directory" in line and synced.slapd.other_dn in line
    assert snapshot(synced.store()) == before


def test_store_path_that_is_a_file_is_refused(synced: TestFarm) -> None:
    blocker = synced.root / "not-a-folder"
    blocker.write_text("x")
    synced.overrides["node"] = {"store": str(blocker / "store")}
    result = synced.run("sync")
    assert result.code == 1
    assert str(blocker) in one_error_line(result)
