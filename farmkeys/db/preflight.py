"""What `farmkeys check` asks of the config DB beyond the farm: this role's privileges on
farmkeys' tables, and the server's clock."""

from __future__ import annotations

from datetime import datetime

from farmkeys.db.connection import Connection

# Every table a node uses: any node may lead, so each needs all four on every one.
FARMKEYS_TABLES = (
    "farm",
    "certificate",
    "node",
    "leader_lease",
    "audit_event",
    "rollover_request",
    "master_key",
    "farm_state",
    "relying_party_fetch",
)
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")


class PreflightQueries(Connection):
    def missing_privileges(self) -> list[tuple[str, str]]:
        """(table, privilege) pairs this role lacks of :data:`FARMKEYS_TABLES` x
        :data:`TABLE_PRIVILEGES` (a missing table counts as lacking everything)."""
        rows = self.fetch(
            "SELECT t.name AS table_name, p.privilege FROM unnest(%(tables)s::text[]) AS t(name)"
            " CROSS JOIN unnest(%(privileges)s::text[]) AS p(privilege)"
            " WHERE to_regclass(t.name) IS NULL"
            "  OR NOT has_table_privilege(current_user, to_regclass(t.name), p.privilege)"
            " ORDER BY t.name, p.privilege",
            {"tables": list(FARMKEYS_TABLES), "privileges": list(TABLE_PRIVILEGES)},
        )
        return [(str(r["table_name"]), str(r["privilege"])) for r in rows]

    def role(self) -> tuple[str, bool]:
        """This connection's role, and whether it is a superuser."""
        (row,) = self.fetch(
            "SELECT current_user AS name, rolsuper AS super FROM pg_roles"
            " WHERE rolname = current_user"
        )
        return str(row["name"]), bool(row["super"])

    def server_time(self) -> datetime:
        """The server's clock now (``clock_timestamp()``, not the transaction's start)."""
        (row,) = self.fetch("SELECT clock_timestamp() AS now")
        moment: datetime = row["now"]
        return moment
