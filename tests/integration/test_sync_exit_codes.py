"""`farmkeys sync`'s exit codes, which decide whether the federation service starts.

0: the store holds the farm's set. 75: a server is out of reach and the installed set can
be served (kept; ``--allow-unreachable`` makes it 0, as the shipped drop-in runs it).
1: anything else: nothing usable installed while a server is away, the farm's set
refused, the login refused. The store is never changed by a failed sync.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from farmtools import TestFarm, add_certificate, db_query, expect_ok, snapshot

from farmkeys.cli.exit_codes import EXIT_ERROR, EXIT_OK, EXIT_UNREACHABLE
from farmkeys_lab.servers import free_port


@pytest.fixture
def synced_farm(initialised_farm: TestFarm) -> TestFarm:
    expect_ok(initialised_farm.run("sync"))
    return initialised_farm


def no_database() -> dict[str, object]:
    return {"dsn": f"postgresql://postgres@127.0.0.1:{free_port()}/farmkeys"}


def no_directory() -> dict[str, object]:
    return {"url": f"ldap://127.0.0.1:{free_port()}"}


def test_an_unreachable_config_db_keeps_the_installed_set_and_exits_75(
    synced_farm: TestFarm,
) -> None:
    store = synced_farm.store()
    before = snapshot(store)
    result = synced_farm.run("sync", database=no_database())
    assert result.code == EXIT_UNREACHABLE, result
    assert result.out == ""
    (line,) = result.err.splitlines()
    assert line.startswith("farmkeys: warning: cannot reach the config DB at 127.0.0.1:"), line
    assert f"kept the installed generation 1 in {store}" in line
    assert snapshot(store) == before
    # As the federation service's drop-in runs it: the service starts on the installed set.
    result = synced_farm.run("sync", "--allow-unreachable", database=no_database())
    assert result.code == EXIT_OK, result
    assert "kept the installed generation 1" in result.err
    assert snapshot(store) == before


def test_an_unreachable_directory_keeps_the_installed_set_and_exits_75(
    synced_farm: TestFarm,
) -> None:
    # A secondary made since: installing it needs the master key, so the directory.
    add_certificate(synced_farm, purpose="signing", role="secondary")
    before = snapshot(synced_farm.store())
    result = synced_farm.run("sync", "--allow-unreachable", directory=no_directory())
    assert result.code == EXIT_OK, result
    assert "farmkeys: warning: cannot reach the directory at ldap://127.0.0.1:" in result.err
    assert snapshot(synced_farm.store()) == before
    assert synced_farm.run("sync", directory=no_directory()).code == EXIT_UNREACHABLE
    expect_ok(synced_farm.run("sync"))  # and installs it once the directory answers


def test_nothing_installed_and_a_server_away_fails_even_with_allow_unreachable(
    initialised_farm: TestFarm,
) -> None:
    result = initialised_farm.run("sync", "--allow-unreachable", database=no_database())
    assert result.code == EXIT_ERROR, result
    (line,) = result.err.splitlines()
    assert line.startswith("farmkeys: error: cannot reach the config DB"), line
    assert "this node cannot serve without it: nothing is installed" in line
    assert not Path(initialised_farm.store()).exists() or not any(
        Path(initialised_farm.store()).iterdir()
    )


def test_a_damaged_installed_set_and_a_server_away_fails(synced_farm: TestFarm) -> None:
    key = synced_farm.store() / "signing" / "primary.key"
    key.write_bytes(key.read_bytes() + b"\n")  # no longer what the manifest records
    result = synced_farm.run("sync", "--allow-unreachable", database=no_database())
    assert result.code == EXIT_ERROR, result
    assert "no longer matches the store's manifest" in result.err


def test_a_refused_farm_set_fails_even_with_allow_unreachable(synced_farm: TestFarm) -> None:
    db_query(
        synced_farm.dsn,
        "UPDATE farm_state SET mac = decode(repeat('00', 32), 'hex') RETURNING version",
    )
    before = snapshot(synced_farm.store())
    result = synced_farm.run("sync", "--allow-unreachable")
    assert result.code == EXIT_ERROR, result
    assert result.err.startswith("farmkeys: error: ")
    assert snapshot(synced_farm.store()) == before


def test_a_refused_login_is_not_an_outage(synced_farm: TestFarm) -> None:
    add_certificate(synced_farm, purpose="signing", role="secondary")
    result = synced_farm.run(
        "sync", "--allow-unreachable", directory={"password": "wrong", "password_file": None}
    )
    assert result.code == EXIT_ERROR, result
    assert "rejected the bind" in result.err
