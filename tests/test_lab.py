"""The lab's private PostgreSQL: its own cluster, closed to anyone without its password."""

from __future__ import annotations

import os
import stat

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from farmkeys.lab.postgres import LocalPostgres


def test_the_private_cluster_listens_on_loopback_and_runs_unprivileged(
    postgres: LocalPostgres,
) -> None:
    with psycopg.connect(postgres.admin_dsn) as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN"
                " ('listen_addresses', 'unix_socket_directories', 'port', 'data_directory')"
            ).fetchall()
        )
    assert settings["listen_addresses"] == "127.0.0.1"
    assert settings["unix_socket_directories"] == ""
    assert int(settings["port"]) == postgres.port != 5432
    data = os.stat(settings["data_directory"])
    assert stat.S_IMODE(data.st_mode) == 0o700
    assert postgres.pid is not None
    owner = os.stat(f"/proc/{postgres.pid}").st_uid
    if os.geteuid() == 0:
        assert owner != 0, "PostgreSQL must not run as root"
        assert data.st_uid == owner
    assert stat.S_IMODE(os.stat(postgres.passfile).st_mode) == 0o600


def test_a_login_without_the_password_is_refused(postgres: LocalPostgres) -> None:
    info = conninfo_to_dict(postgres.admin_dsn)
    info.pop("passfile")
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(make_conninfo(**{k: str(v) for k, v in info.items()}), passfile="/dev/null")
    wrong = make_conninfo(**{k: str(v) for k, v in info.items()}, password="not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong)


def test_a_restart_keeps_the_port_and_the_data(postgres: LocalPostgres, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (42)")
    port, pid = postgres.port, postgres.pid
    postgres.restart()
    assert postgres.port == port and postgres.pid != pid
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]
