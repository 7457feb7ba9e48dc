"""The ``audit_event`` table: what was done to the farm, by which node, under which term,
and, for what an operator's request asked, who asked and why.

Written inside the transaction that makes the change it records, so the log never
claims a change that did not commit; read by `farmkeys events`.

Who asked comes from one place: while the leader carries out an authenticated request,
it holds :func:`attributed_to` with what the request's verified body says, and every
event written meanwhile (however deep in the leader's steps, across every transaction of
a master-key roll) records it, with the request's id. A command that changes the farm itself
(`init`, `escrow export` and `import`, `nodes remove`) records its own account, host and
``--reason`` with no request id. Nothing else sets them, so an event's requester is never a
column a DB writer filled in for the leader to copy.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime

from farmkeys.db.connection import Connection, Statements
from farmkeys.db.rows import Attribution, AuditEvent, audit_event_row
from farmkeys.formats.request import Requester

# Per thread (and task): a serving node's other threads never inherit a request's requester.
_ASKED_BY: ContextVar[Attribution | None] = ContextVar("farmkeys_audit_asked_by", default=None)


@contextmanager
def attributed_to(attribution: Attribution) -> Iterator[None]:
    """Record ``attribution`` (an authenticated request and who asked) in every audit
    event this thread writes until the block ends."""
    token = _ASKED_BY.set(attribution)
    try:
        yield
    finally:
        _ASKED_BY.reset(token)


class AuditQueries(Connection):
    def events(self, *, since: datetime | None = None) -> list[AuditEvent]:
        """The audit log, oldest first."""
        rows = self.fetch(
            "SELECT id, at, node, term, action, purpose, certificate, thumbprint, master_key,"
            " detail, request, account, host, reason"
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
        by: Requester | None = None,
    ) -> None:
        """Record an event, with the request it carries out and who asked when the leader
        holds :func:`attributed_to`; or, for a command that changes the farm itself (`init`,
        `escrow`, `nodes remove`: no request, no leader), ``by``, who ran it."""
        asked = _ASKED_BY.get()
        columns: tuple[int | None, str | None, str | None, str | None]
        if asked is not None:
            columns = asked.columns()
        elif by is not None:
            columns = (None, by.account, by.host, by.reason)
        else:
            columns = (None, None, None, None)
        self.execute(
            "INSERT INTO audit_event (node, term, action, purpose, certificate, thumbprint,"
            " master_key, detail, request, account, host, reason)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (node, term, action, purpose, certificate, thumbprint, master_key, detail, *columns),
        )
