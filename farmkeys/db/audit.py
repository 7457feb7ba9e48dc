"""The ``audit_event`` table: what was done to the farm, by which node, under which term.

Written inside the transaction that makes the change it records, so the log never
claims a change that did not commit; read by `farmkeys events`.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from farmkeys.db.connection import Connection, Statements
from farmkeys.db.rows import AuditEvent, audit_event_row


class AuditQueries(Connection):
    def events(self, *, since: datetime | None = None) -> list[AuditEvent]:
        """The audit log, oldest first."""
        rows = self.fetch(
            "SELECT id, at, node, term, action, purpose, certificate, thumbprint, master_key,"
            " detail"
            " FROM audit_event WHERE %(since)s::timestamptz IS NULL OR at >= %(since)s"
            " ORDER BY at, id",
            {"since": since},
        )
        return [audit_event_row(r) for r in rows]


class AuditWrites(Statements):
    def audit(
        self,
        *,
        node: str,
        term: int | None,
        action: str,
        purpose: str | None = None,
        certificate: uuid.UUID | None = None,
        thumbprint: str | None = None,
        master_key: uuid.UUID | None = None,
        detail: str = "",
    ) -> None:
        self.execute(
            "INSERT INTO audit_event (node, term, action, purpose, certificate, thumbprint,"
            " master_key, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (node, term, action, purpose, certificate, thumbprint, master_key, detail),
        )
