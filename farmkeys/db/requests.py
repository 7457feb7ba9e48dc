"""The ``rollover_request`` queue: operators' requests to the leader, and its answers.

A row is a DB writer's to forge: the leader acts on a request only once the MAC of its
signed body verifies under a master key (:mod:`farmkeys.formats.request`), and answers every
other row with a refusal.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

from farmkeys.db.connection import REQUEST_CHANNEL, Connection, Statements
from farmkeys.db.rows import RequestAnswer, RequestRow, request_row

# The columns the leader authenticates a pending request by (and compares, under the row's
# lock, with what it authenticated).
_PENDING = (
    "SELECT id, requested_by, purpose, urgent, master_key, repair_state, revert,"
    " import_certificate, import_blob, import_role, import_source, body, mac,"
    " account, host, reason"
    " FROM rollover_request WHERE done_at IS NULL"
)


class RequestQueries(Connection):
    def file_request(
        self,
        *,
        node_id: str,
        purpose: str | None,
        urgent: bool,
        master_key: bool = False,
        repair_state: bool = False,
        revert: bool = False,
        import_: tuple[uuid.UUID, bytes, str, str] | None = None,
        requester: tuple[str, str, str | None],
        sign: Callable[[int, datetime], tuple[bytes, bytes]],
    ) -> int:
        """Queue a request for the leader and wake it; the request's id.

        ``sign(id, now)`` makes the request's body and MAC (:mod:`farmkeys.formats.request`) once
        the row has its id, with the config DB's clock; both are written in the same
        transaction, so the leader never sees the row unsigned. ``import_``: the
        certificate id, sealed blob, role and source of `import adfs`. ``revert``: the
        row is a `rollover --revert`. ``requester``: the
        account, host and reason the body names, copied into their columns for reading."""
        cert, blob, role, source = import_ if import_ is not None else (None, None, None, None)
        account, host, reason = requester
        with self._transaction(Statements) as tx:
            rows = tx.execute(
                "INSERT INTO rollover_request (requested_by, purpose, urgent, master_key,"
                " repair_state, revert, import_certificate, import_blob, import_role,"
                " import_source, account, host, reason)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " RETURNING id, now() AS now",
                (
                    *(node_id, purpose, urgent, master_key, repair_state, revert),
                    *(cert, blob, role, source, account, host, reason),
                ),
            )
            request_id = int(rows[0]["id"])
            body, mac = sign(request_id, rows[0]["now"])
            tx.execute(
                "UPDATE rollover_request SET body = %s, mac = %s WHERE id = %s",
                (body, mac, request_id),
            )
            tx.notify(REQUEST_CHANNEL, str(request_id))
        return request_id

    def request_answer(self, request_id: int) -> RequestAnswer:
        """The answer of request ``request_id`` (``done_at`` None while it waits)."""
        rows = self.fetch(
            "SELECT done_at, done_by, term, ok, result FROM rollover_request WHERE id = %s",
            (request_id,),
        )
        return RequestAnswer(**rows[0])

    def requests_pending(self) -> bool:
        """Whether any request waits for an answer."""
        rows = self.fetch(
            "SELECT EXISTS (SELECT 1 FROM rollover_request WHERE done_at IS NULL) AS pending"
        )
        return bool(rows[0]["pending"])

    def next_request(self) -> RequestRow | None:
        """The oldest pending request, as its columns read (read outside any transaction)."""
        rows = self.fetch(_PENDING + " ORDER BY id LIMIT 1")
        return request_row(rows[0]) if rows else None

    def withdraw_request(self, request_id: int, why: str) -> bool:
        """Mark a request nobody carried out as done and failed; False if it was answered."""
        rows = self.fetch(
            "UPDATE rollover_request SET done_at = now(), ok = false, result = %s"
            " WHERE id = %s AND done_at IS NULL RETURNING id",
            (why, request_id),
        )
        return bool(rows)


class RequestWrites(Statements):
    """The leader's side of the queue, inside its fenced transaction."""

    def lock_pending_request(self, request_id: int) -> RequestRow | None:
        """The request's columns, locked for this transaction, while it is still pending and
        no other transaction holds it; None otherwise."""
        rows = self.execute(_PENDING + " AND id = %s FOR UPDATE SKIP LOCKED", (request_id,))
        return request_row(rows[0]) if rows else None

    def answer_request(
        self, request_id: int, *, node: str, term: int, ok: bool, result: str
    ) -> None:
        """Record the answer to a pending request (an answered one keeps its answer)."""
        self.execute(
            "UPDATE rollover_request SET done_at = now(), done_by = %s, term = %s,"
            " ok = %s, result = %s WHERE id = %s AND done_at IS NULL",
            (node, term, ok, result, request_id),
        )
