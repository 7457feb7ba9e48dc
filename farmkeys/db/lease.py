"""The ``leader_lease`` row: which process leads, under which term, until when.

Every judgement is by the config DB's clock. Taking or renewing the lease is one UPDATE
that succeeds only when the lease is free, expired or already ours, and that raises the
term whenever the holder changes; the fence (:mod:`farmkeys.election`) locks the row and
checks it before a leader's write.
"""

from __future__ import annotations

from farmkeys.db.connection import Connection, Statements
from farmkeys.db.rows import FenceCheck, Lease

# Re-creates a lease row deleted by hand, under the highest term the audit log has seen,
# so terms never go back (the next holder takes that term + 1).
_RECREATE_LEASE = (
    "INSERT INTO leader_lease (singleton, term)"
    " SELECT true, COALESCE(max(term), 0) FROM audit_event ON CONFLICT DO NOTHING"
)


class LeaseQueries(Connection):
    def lease(self) -> Lease | None:
        """The lease row as the config DB sees it now; None when the row is missing."""
        rows = self.fetch(
            "SELECT holder, holder_node, term, acquired_at, expires_at,"
            " holder IS NOT NULL AND expires_at > now() AS valid, now() AS now FROM leader_lease"
        )
        return Lease(**rows[0]) if rows else None

    def take_lease(self, *, me: str, node: str, ttl_seconds: float) -> int | None:
        """Take the lease if it is free or expired, renew it if ``me`` holds it: the term
        ``me`` now leads under, or None (another holds it, or the row is missing)."""
        rows = self.fetch(
            # A new term whenever the lease changes hands or had run out, even back to the
            # same process: what it wrote under the old term can no longer pass the fence.
            "UPDATE leader_lease SET"
            " term = CASE WHEN holder IS DISTINCT FROM %(me)s OR expires_at IS NULL"
            "  OR expires_at <= now() THEN term + 1 ELSE term END,"
            " acquired_at = CASE WHEN holder IS DISTINCT FROM %(me)s OR expires_at IS NULL"
            "  OR expires_at <= now() THEN now() ELSE acquired_at END,"
            " holder = %(me)s, holder_node = %(node)s,"
            " expires_at = now() + make_interval(secs => %(ttl)s)"
            " WHERE holder = %(me)s OR holder IS NULL OR expires_at <= now()"
            " OR expires_at IS NULL"
            " RETURNING term",
            {"me": me, "node": node, "ttl": ttl_seconds},
        )
        return int(rows[0]["term"]) if rows else None

    def lease_row_exists(self) -> bool:
        return bool(self.fetch("SELECT 1 FROM leader_lease"))

    def recreate_lease(self) -> None:
        """Put back a lease row deleted by hand, nobody's, under the highest term seen."""
        self.fetch(_RECREATE_LEASE + " RETURNING term")

    def release_lease(self, me: str) -> None:
        """``me`` gives the lease up at once, if it holds it."""
        self.fetch(
            "UPDATE leader_lease SET holder = NULL, holder_node = NULL, expires_at = now()"
            " WHERE holder = %s",
            (me,),
        )


class LeaseWrites(Statements):
    def check_fence(self) -> FenceCheck | None:
        """Lock the lease row, then read it with its expiry judged by the clock as it reads
        once the lock is held (now() is the transaction's start, before any wait for the
        lock); None when the row is missing."""
        self.execute("SELECT 1 FROM leader_lease FOR UPDATE")
        # The fence's `now` stays the transaction's: every time the write stamps (audit
        # `at`, `role_since`) is now(), and the policy must agree with them.
        rows = self.execute(
            "SELECT holder, term, expires_at > clock_timestamp() AS valid,"
            " now() AS now FROM leader_lease"
        )
        return FenceCheck(**rows[0]) if rows else None
