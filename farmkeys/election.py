"""The leader lease and the fenced transaction.

One row in ``leader_lease`` says which process leads, under which ``term``,
until when. Everything is judged by the config DB's clock (``now()``), never a
node's. Taking or renewing the lease is one UPDATE that succeeds only when the
lease is free, expired, or already ours, and that raises ``term`` whenever the
holder changes.

Every leader write runs inside :meth:`Election.fenced`: a transaction that
first locks the lease row and then checks ``holder = me AND term = my term AND
expires_at > clock_timestamp()``: the clock as it reads once the lock is held,
not ``now()``, which is the transaction's start and would let a write that
waited for the lock past the lease's end go through. If the check fails, nothing is written and
:class:`~farmkeys.errors.LeaseLostError` is raised. Because the lease row stays
locked until the write commits, a new leader's UPDATE waits for it: a paused
or partitioned old leader can never write after another took over.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from farmkeys.config import LeaseConfig
from farmkeys.db import ConfigDB, Lease, Transaction
from farmkeys.errors import LeaseLostError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fence:
    """An open fenced transaction: the caller writes through ``tx``."""

    tx: Transaction
    term: int
    now: datetime  # the database's clock at the start of the transaction


def instance_id(node_id: str) -> str:
    """A name for this process: the node, the host's process id, and a random suffix."""
    return f"{node_id}/{socket.gethostname()}:{os.getpid()}/{uuid.uuid4().hex[:8]}"


def read_lease(db: ConfigDB) -> Lease:
    """The lease row; a missing row (deleted by hand) reads as a lease nobody holds."""
    lease = db.lease()
    if lease is None:
        return Lease(None, None, 0, None, None, valid=False, now=db.now())
    return lease


class Election:
    """This process's side of the lease: acquire, renew, release, and fence writes."""

    def __init__(self, db: ConfigDB, *, node_id: str, lease: LeaseConfig) -> None:
        self._db = db
        self._lease = lease
        self.node_id = node_id
        self.identity = instance_id(node_id)
        self._term: int | None = None
        self._lock = threading.Lock()

    @property
    def term(self) -> int | None:
        """The term this process leads under, or None when it believes it does not lead."""
        return self._term

    @property
    def leading(self) -> bool:
        return self._term is not None

    def step_down(self) -> None:
        """Forget leadership locally (the fence is what protects the data)."""
        with self._lock:
            self._term = None

    def try_acquire(self) -> bool:
        """Take the lease if it is free or expired, renew it if ours; True when we lead.

        A lease row that is missing is re-created first (it heals itself).
        """
        term = self._take()
        if term is None and not self._db.lease_row_exists():
            log.warning("the leader lease row is missing from the config DB; re-creating it")
            self._db.recreate_lease()
            term = self._take()
        with self._lock:
            before = self._term
            self._term = term
            after = self._term
        if after is not None and before != after:
            log.info("%s leads the farm under term %d", self.node_id, after)
        elif after is None and before is not None:
            log.warning("%s lost the lease of term %d; stepping down", self.node_id, before)
        return after is not None

    def _take(self) -> int | None:
        return self._db.take_lease(
            me=self.identity, node=self.node_id, ttl_seconds=self._lease.ttl_seconds
        )

    def release(self) -> None:
        """Give the lease up at once (on a clean stop), so another node need not wait it out."""
        with self._lock:
            self._term = None
        self._db.release_lease(self.identity)

    @contextmanager
    def fenced(self, db: ConfigDB | None = None) -> Iterator[Fence]:
        """A transaction that proves this process still holds its term before anything else.

        ``db`` is the connection to write on (default: the election's own).
        Raises :class:`LeaseLostError` — and writes nothing — when the lease is
        no longer ours; this process then steps down.
        """
        term = self._term
        with (db or self._db).transaction() as tx:
            row = tx.check_fence()
            if row is None:
                self.step_down()
                raise LeaseLostError(
                    "the leader lease row is missing from the config DB",
                    "the next lease attempt re-creates it; nothing was written",
                )
            if term is None or row.holder != self.identity or row.term != term:
                self.step_down()
                raise LeaseLostError(
                    f"{self.node_id} no longer holds the leader lease"
                    + (f" of term {term}" if term is not None else "")
                    + f" (now term {row.term})",
                    "another node leads; nothing was written",
                )
            if not row.valid:
                self.step_down()
                raise LeaseLostError(
                    f"the leader lease of term {term} held by {self.node_id} has expired",
                    "renew it before writing; nothing was written",
                )
            yield Fence(tx=tx, term=term, now=row.now)
