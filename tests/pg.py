"""A throwaway PostgreSQL database per test, on the machine's real server.

The server is the one at $FARMKEYS_TEST_PG (default postgresql://postgres@127.0.0.1:5432/postgres).
Each database gets a unique name and is dropped afterwards; no other database is touched.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

ADMIN_DSN = os.environ.get("FARMKEYS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(ADMIN_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"the test PostgreSQL at {ADMIN_DSN} is not reachable ({exc}); start it with "
            "`pg_ctlcluster --skip-systemctl-redirect 15 main start` or run `make test`",
            pytrace=False,
        )


def dsn_for(dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(ADMIN_DSN)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    """The DSN of a new, empty database, dropped after the test."""
    name = f"farmkeys_test_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield dsn_for(name)
    finally:
        with _admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_role() -> Iterator[str]:
    """A role that exists but may not log in, dropped after the test."""
    name = f"farmkeys_nologin_{uuid.uuid4().hex[:8]}"
    with _admin() as admin:
        admin.execute(f'CREATE ROLE "{name}" NOLOGIN')
    try:
        yield name
    finally:
        with _admin() as admin:
            admin.execute(f'DROP ROLE IF EXISTS "{name}"')
