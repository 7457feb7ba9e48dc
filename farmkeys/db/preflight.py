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
        """(object, privilege) pairs this role lacks: of :data:`FARMKEYS_TABLES` x
        :data:`TABLE_PRIVILEGES` (a missing table counts as lacking everything), and USAGE
        on the sequences that number their rows (a request or an audit event cannot be
        inserted without it)."""
        rows = self.fetch(
            "SELECT t.name AS object, p.privilege FROM unnest(%(tables)s::text[]) AS t(name)"
            " CROSS JOIN unnest(%(privileges)s::text[]) AS p(privilege)"
            " WHERE to_regclass(t.name) IS NULL"
            "  OR NOT has_table_privilege(current_user, to_regclass(t.name), p.privilege)"
            " UNION ALL"
            " SELECT s.relname, 'USAGE' FROM pg_class s"
            " JOIN pg_depend d ON d.objid = s.oid AND d.deptype IN ('a', 'i')"
            " JOIN pg_class t ON t.oid = d.refobjid"
            " WHERE s.relkind = 'S' AND t.relname = ANY(%(tables)s::text[])"
            "  AND pg_table_is_visible(t.oid)"
            "  AND NOT has_sequence_privilege(current_user, s.oid, 'USAGE')"
            " ORDER BY 1, 2",
            {"tables": list(FARMKEYS_TABLES), "privileges": list(TABLE_PRIVILEGES)},
        )
        return [(str(r["object"]), str(r["privilege"])) for r in rows]

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
