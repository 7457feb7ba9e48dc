"""Bad input and unreachable servers: one clear line, a non-zero exit, nothing changed."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from farmtools import Result, TestFarm, add_certificate, expect_ok, one_error_line, snapshot

from farmkeys import cli


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


def run_cli(*argv: str, capsys: pytest.CaptureFixture[str]) -> Result:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err, ("farmkeys", *argv))


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "does not exist"),
        ("[farm\nname = 'x'", "is not valid TOML"),
        ("[farm]\nname = 'x'\nnmae = 'y'\n", "has an unknown key 'nmae'"),
        ("[farm]\nname = 42\n", "farm.name must be a string, not int 42"),
    ],
)
def test_bad_config_file_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, message: str
) -> None:
    path = tmp_path / "farmkeys.toml"
    if text is not None:
        path.write_text(text)
    for command in (["sync"], ["init"], ["status"], ["db", "upgrade"]):
        result = run_cli(*command, "--config", str(path), capsys=capsys)
        assert result.code == (3 if command == ["status"] else 1)  # status: cannot tell
        assert message in one_error_line(result)
        assert result.out == ""


def test_bad_environment_override_is_one_line_and_exit_1(
    synced: TestFarm, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FARMKEYS_POLICY_CERTIFICATE_DURATION", "a year")
    result = run_cli("sync", "--config", str(synced.config()), capsys=capsys)
    assert result.code == 1
    assert "FARMKEYS_POLICY_CERTIFICATE_DURATION must be an integer" in one_error_line(result)


def test_a_secret_of_the_wrong_type_is_not_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "farmkeys.toml"
    path.write_text("[directory]\npassword = 918273645\n")
    path.chmod(0o600)
    result = run_cli("sync", "--config", str(path), capsys=capsys)
    line = one_error_line(result)
    assert "directory.password must be a string" in line
    assert "918273645" not in result.err


def test_a_usage_error_exits_64_never_a_status_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["status", "--jsno"])
    assert done.value.code == 64
    assert "unrecognized arguments: --jsno" in capsys.readouterr().err


def test_debug_adds_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli("sync", "--debug", "--config", str(tmp_path / "none.toml"), capsys=capsys)
    assert result.code == 1
    assert "Traceback (most recent call last)" in result.err
    assert result.err.rstrip().splitlines()[-1].startswith("farmkeys: error: ")


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["init"], ["db", "upgrade"], ["sync"], ["status"]):
        with pytest.raises(SystemExit) as done:
            cli.main([*command, "--help"])
        assert done.value.code == 0
        assert "usage: farmkeys" in capsys.readouterr().out


# -- the config DB --------------------------------------------------------------------------


def test_unreachable_config_db_is_retried_then_named(synced: TestFarm) -> None:
    before = snapshot(synced.store())
    result = synced.run("sync", database={"dsn": "postgresql://postgres@127.0.0.1:1/farm"})
    assert result.code == 1
    line = one_error_line(result)
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
    assert result.code == 1
    line = one_error_line(result)
    assert "cannot reach the directory at ldap://127.0.0.1:1" in line
    assert "retrying" in result.err  # the warnings between attempts
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
