"""The database administrator's SQL of docs/deploy-walkthrough.md, step 1, run as written
on the session's PostgreSQL: the owner role applies the schema with `farmkeys init`, and
the node role, given nothing but what the default privileges grant, passes `farmkeys check`
and does a node's work (sync, and a rollover it leads itself), while it may not create a
table.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from farmtools import REPO, TestFarm, expect_ok
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from farmkeys_lab.postgres import LocalPostgres

WALKTHROUGH = REPO / "docs" / "deploy-walkthrough.md"


def dba_statements(owner: str, node: str) -> list[str]:
    """The page's SQL block with its role names replaced, less the statements that make
    and enter the database (the test's database exists)."""
    text = WALKTHROUGH.read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```sql\n(.*?)```", text, re.DOTALL) if "OWNER" in b)
    lines = [line for line in block.splitlines() if not line.startswith(("--", "\\"))]
    statements = [s.strip() for s in " ".join(lines).split(";") if s.strip()]
    renamed = [
        re.sub(r"\bfarmkeys\b", node, re.sub(r"\bfarmkeys_owner\b", owner, s)) for s in statements
    ]
    return [s for s in renamed if not s.startswith("CREATE DATABASE")]


@pytest.fixture
def roles(postgres: LocalPostgres, farm: TestFarm) -> Iterator[dict[str, str]]:
    """The owner's and the node's DSNs, the roles made by the page's SQL."""
    suffix = uuid.uuid4().hex[:8]
    owner, node = f"fk_owner_{suffix}", f"fk_node_{suffix}"
    dbname = str(conninfo_to_dict(farm.dsn)["dbname"])
    passwords = {owner: secrets.token_hex(16), node: secrets.token_hex(16)}
    statements = dba_statements(owner, node)
    assert [s.split()[0] for s in statements] == ["CREATE", "CREATE", "ALTER", "ALTER"]
    with psycopg.connect(farm.dsn, autocommit=True) as admin:
        for statement in statements:
            admin.execute(statement.encode())
        for name, password in passwords.items():
            admin.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(name), sql.Literal(password)
                )
            )
        # CREATE DATABASE ... OWNER <owner>, for the database the test already has.
        admin.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(dbname), sql.Identifier(owner)
            )
        )
    try:
        yield {
            key: make_conninfo(postgres.dsn_for(dbname, user=name), password=passwords[name])
            for key, name in (("owner", owner), ("node", node))
        }
    finally:
        with psycopg.connect(farm.dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("ALTER DATABASE {} OWNER TO CURRENT_USER").format(sql.Identifier(dbname))
            )
            for name in (node, owner):
                admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_the_dba_sql_gives_the_node_role_exactly_what_a_node_needs(
    farm: TestFarm, roles: dict[str, str]
) -> None:
    as_owner = {"database": {"dsn": roles["owner"]}}
    as_node = {"database": {"dsn": roles["node"]}}
    expect_ok(farm.run("init", **as_owner))

    expect_ok(farm.run("sync", **as_node))
    result = farm.run("check", "--json", **as_node)
    checks = {c["name"]: c for c in json.loads(result.out)["checks"]}
    assert checks["DB privileges"]["result"] == "ok", checks["DB privileges"]
    assert checks["config DB"]["result"] == "ok", checks["config DB"]

    # A node may lead: no node serves, so the command takes the lease and writes as leader.
    rolled = farm.spawn("rollover", "--purpose", "signing", "--wait", "30", **as_node)
    expect_ok(rolled)
    assert re.search(r"signing: new secondary [0-9A-F]{40}", rolled.out), rolled.out
    expect_ok(farm.run("sync", **as_node))
    expect_ok(farm.run("events", **as_node))

    # The node role may use farmkeys' tables, not make new ones.
    with (
        psycopg.connect(roles["node"], autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("CREATE TABLE not_farmkeys (x int)")
