"""The ``master_key`` table: the leader's journal of the master keys' lifecycle.

A new key is recorded ``pending`` before the directory holds it, and every later step
(current, previous, deleted) is a statement of the leader's fenced transaction. The table
holds ids and times, never a key's bytes; and a DB writer may edit it, so the leader
takes the current key and every deletion from the authenticated farm state record, not
from here (docs/security.md).
"""

from __future__ import annotations

import uuid
from datetime import datetime

from farmkeys.db.connection import Connection, Statements
from farmkeys.db.rows import KeyUse, MasterKeyRow, master_key_row

_MASTER_KEYS = (
    "SELECT id, state, created_at, current_since, replaced_at, unused_since, delete_now,"
    " deleted_at, urgent, request, reason FROM master_key ORDER BY created_at, id"
)


class MasterKeyQueries(Connection):
    def master_keys(self) -> list[MasterKeyRow]:
        """Every master key the farm has recorded, oldest first."""
        return [master_key_row(r) for r in self.fetch(_MASTER_KEYS)]


class MasterKeyWrites(Statements):
    """The leader's steps of a master key's lifecycle, inside its fenced transaction."""

    def master_keys(self) -> list[MasterKeyRow]:
        """Every recorded master key, locked until the transaction ends."""
        return [master_key_row(r) for r in self.execute(_MASTER_KEYS + " FOR UPDATE")]

    def record_master_key(
        self,
        key_id: uuid.UUID,
        *,
        stage: str,
        created_at: datetime | None = None,
        urgent: bool = False,
        request: int | None = None,
        reason: str = "",
    ) -> None:
        """Record a master key: a new ``pending`` one, or one found in the directory."""
        self.execute(
            "INSERT INTO master_key (id, state, created_at, current_since, urgent, request,"
            " reason) VALUES (%(id)s, %(state)s, coalesce(%(created)s, now()),"
            " CASE WHEN %(state)s = 'current' THEN now() END, %(urgent)s, %(request)s,"
            " %(reason)s)",
            {
                "id": key_id,
                "state": stage,
                "created": created_at,
                "urgent": urgent,
                "request": request,
                "reason": reason,
            },
        )

    def join_pending_roll(self, key_id: uuid.UUID, *, request: int | None, urgent: bool) -> None:
        """A request (or urgency) joins the roll to ``key_id`` already under way."""
        self.execute(
            "UPDATE master_key SET request = coalesce(request, %s),"
            " urgent = urgent OR %s WHERE id = %s",
            (request, urgent, key_id),
        )

    def make_current(self, key_id: uuid.UUID, *, urgent: bool) -> None:
        """``key_id`` becomes current; the key current until now becomes previous, unused
        from now on, and (``urgent``) due for deletion at once."""
        self.execute(
            "UPDATE master_key SET state = 'previous', replaced_at = now(),"
            " unused_since = now(), delete_now = %s WHERE state = 'current'",
            (urgent,),
        )
        self.execute(
            "UPDATE master_key SET state = 'current', current_since = now() WHERE id = %s",
            (key_id,),
        )

    def mark_unused(self, key_id: uuid.UUID) -> None:
        """A previous key that no live blob names is unused from now (if not already)."""
        self.execute(
            "UPDATE master_key SET unused_since = now() WHERE id = %s AND state = 'previous'"
            " AND unused_since IS NULL AND NOT EXISTS (SELECT 1 FROM certificate"
            " WHERE master_key = %s AND role <> 'archived')",
            (key_id, key_id),
        )

    def key_use(self, key_id: uuid.UUID) -> KeyUse:
        """How many live and archived certificates are sealed under ``key_id``."""
        row = self.execute(
            "SELECT count(*) FILTER (WHERE role <> 'archived') AS live,"
            " count(*) FILTER (WHERE role = 'archived') AS archived"
            " FROM certificate WHERE master_key = %s",
            (key_id,),
        )[0]
        return KeyUse(live=row["live"], archived=row["archived"])

    def key_stage(self, key_id: uuid.UUID) -> str | None:
        """The stage the table records for ``key_id``; None when it records no such key."""
        rows = self.execute("SELECT state FROM master_key WHERE id = %s", (key_id,))
        return str(rows[0]["state"]) if rows else None

    def mark_deleted(self, key_id: uuid.UUID) -> None:
        self.execute(
            "UPDATE master_key SET state = 'deleted', deleted_at = now() WHERE id = %s",
            (key_id,),
        )

    def previous_keys(self) -> list[uuid.UUID]:
        """The keys the table marks replaced (``previous``)."""
        return [r["id"] for r in self.execute("SELECT id FROM master_key WHERE state = 'previous'")]

    def deleted_keys_unnamed_by_live(self) -> set[uuid.UUID]:
        """The keys the table marks deleted that no live blob names."""
        rows = self.execute(
            "SELECT id FROM master_key WHERE state = 'deleted' AND NOT EXISTS (SELECT 1 FROM"
            " certificate c WHERE c.master_key = master_key.id AND c.role <> 'archived')"
        )
        return {r["id"] for r in rows}
