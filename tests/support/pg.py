"""PostgreSQL for the tests: one private cluster per session, a throwaway database per test.

The cluster is farmkeys_lab.postgres.LocalPostgres: initdb in the session's
temporary folder, a free port on 127.0.0.1, stopped and deleted at the end.
The machine's own PostgreSQL, if it has one, is never touched.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from farmkeys_lab.postgres import LocalPostgres, PostgresError, find_bindir


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """The session's private PostgreSQL. A test that stops it must start it again."""
    if find_bindir() is None:
        pytest.fail(
            "PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or $PATH); "
            "the tests need a real server — apt-get install postgresql, or run `make test`",
            pytrace=False,
        )
    server = LocalPostgres(tmp_path_factory.mktemp("postgres"))
    try:
        server.start()
    except PostgresError as exc:
        pytest.fail(f"could not start the test PostgreSQL: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def pg_dsn(postgres: LocalPostgres) -> Iterator[str]:
    """The DSN of a new, empty database, dropped after the test."""
    name = f"farmkeys_test_{uuid.uuid4().hex[:12]}"
    dsn = postgres.create_database(name)
    try:
        yield dsn
    finally:
        postgres.start()  # a test that stopped the server and failed before starting it again
        postgres.drop_database(name)


@pytest.fixture
def pg_role(postgres: LocalPostgres) -> Iterator[str]:
    """The DSN of a role that exists, has a right password, but may not log in; dropped after."""
    name = f"farmkeys_nologin_{uuid.uuid4().hex[:8]}"
    password = secrets.token_hex(16)
    with psycopg.connect(postgres.admin_dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} NOLOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
    try:
        yield make_conninfo(postgres.dsn_for("postgres", user=name), password=password)
    finally:
        with psycopg.connect(postgres.admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP ROLE IF EXISTS "{name}"')


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[LocalPostgres, LocalPostgres]]:
    """A private primary and its synchronous streaming standby (not the session's cluster,
    whose commits would then wait for a standby); both removed after the test."""
    primary = LocalPostgres(tmp_path / "primary")
    try:
        primary.start()
        standby = primary.standby(tmp_path / "standby")
        try:
            yield primary, standby
        finally:
            standby.remove()
    finally:
        primary.remove()
