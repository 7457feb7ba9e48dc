"""The node's side of serve, on the main thread: LISTEN on the config DB and keep the store
in step.

It re-syncs within a second of a change notification, at start, after a
reconnect, and every ``node.poll_seconds`` in any case; a sync that failed is
tried again after 1, 2, 4 ... s (at most 30 s or the poll). A request
notification is passed on to the leader's jobs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from farmkeys import sync as node_sync
from farmkeys.config import Config
from farmkeys.db import CHANGED_CHANNEL, REQUEST_CHANNEL, ConfigDB
from farmkeys.directory import Directory
from farmkeys.errors import DatabaseError, Error
from farmkeys.serve.hook import OnChangeHook
from farmkeys.serve.readiness import Readiness, readable_manifest
from farmkeys.store import Store

# The name these lines have always carried, before serve became a package.
log = logging.getLogger("farmkeys.serve")

# How often the main thread wakes to notice a stop request while it waits.
_WAKE_SECONDS = 0.5
# After a failed sync the node tries again after 1 s, then 2, 4, ... up to this (or the poll).
_SYNC_RETRY_FIRST_SECONDS = 1.0
_SYNC_RETRY_MAX_SECONDS = 30.0


def sync_retry_delay(failures: int, poll_seconds: float) -> float:
    """Seconds until the next sync after ``failures`` failed ones in a row (0: the poll period).

    A change the node was told about but could not install (the directory or
    the config DB away for a moment) is retried within seconds, not left for
    the next poll.
    """
    if failures <= 0:
        return poll_seconds
    backoff: float = _SYNC_RETRY_FIRST_SECONDS * 2.0 ** min(failures - 1, 16)
    return min(backoff, _SYNC_RETRY_MAX_SECONDS, poll_seconds)


class Syncer:
    """The listen loop and the syncs it runs, and what the last one learnt.

    ``on_request`` is called for each request notification while ``leading()``.
    """

    def __init__(
        self,
        config: Config,
        db: ConfigDB,
        directory: Directory,
        store: Store,
        *,
        hook: OnChangeHook,
        readiness: Readiness,
        leading: Callable[[], bool],
        on_request: Callable[[], None],
    ) -> None:
        self.config = config
        self.node_id = config.node.id
        self._db = db
        self._directory = directory
        self._store = store
        self._hook = hook
        self._readiness = readiness
        self._leading = leading
        self._on_request = on_request
        self.group: uuid.UUID | None = None  # the farm's DKM group, known after a sync
        self.master_keys: tuple[uuid.UUID, ...] = ()  # master keys the last sync opened with
        self.last_error: Error | None = None  # the last sync's, None when it succeeded
        self.listening = False  # the config DB listener is connected
        self.syncs = 0
        self.sync_errors = 0
        self._failed_syncs = 0  # in a row; the next sync is retried sooner than the poll

    def listen(self, stop: threading.Event) -> None:
        """Wait for notifications and sync, until ``stop`` is set."""
        next_poll = 0.0  # sync at once
        seen = 0  # the connection count at the last catch-up
        while not stop.is_set():
            self._readiness.watchdog()
            if time.monotonic() >= next_poll:
                self.sync()
                next_poll = time.monotonic() + self._next_sync_in()
            wait = max(0.0, min(_WAKE_SECONDS, next_poll - time.monotonic()))
            try:
                notes = self._db.wait(wait)
            except DatabaseError as exc:
                if self.listening:
                    log.warning("%s lost the config DB: %s; reconnecting", self.node_id, exc.what)
                self.listening = False
                stop.wait(1.0)
                continue
            self.listening = True
            if self._db.connects != seen:
                # A new connection: whatever was notified while there was none is lost.
                next_poll = 0.0 if seen else next_poll
                seen = self._db.connects
            changed = False
            for note in notes:
                if note.channel == CHANGED_CHANNEL:
                    changed = True  # a burst of notifications is one sync
                elif note.channel == REQUEST_CHANNEL and self._leading():
                    self._on_request()
            if changed:
                self.sync()
                next_poll = min(next_poll, time.monotonic() + self._next_sync_in())

    def _next_sync_in(self) -> float:
        return sync_retry_delay(self._failed_syncs, self.config.node.poll_seconds)

    def sync(self) -> bool:
        """Sync the store now; True when it succeeded. Failures are logged and recorded,
        and counted so the next attempt comes sooner than the poll (:func:`sync_retry_delay`)."""
        before = readable_manifest(self._store) if self._hook.enabled else None  # for the hook
        try:
            report = node_sync.sync(
                self.config, self._db, self._directory, self._store, now=datetime.now(UTC)
            )
        except Error as exc:
            self._failed(exc)
            return False
        self.syncs += 1
        self.last_error = None
        recovered = self._failed_syncs > 0
        self._failed_syncs = 0
        self.group = report.dkm_group
        self.master_keys = report.master_keys
        if report.changed:
            self._hook.run(before, report.manifest)
        readiness = self._readiness
        readiness.synced()
        if not readiness.maybe_ready() and (report.changed or recovered) and readiness.address:
            readiness.status(readiness.describe())
        return True

    def _failed(self, exc: Error) -> None:
        self.last_error = exc
        self.syncs += 1
        self.sync_errors += 1
        self._failed_syncs += 1
        self._readiness.sync_failed()
        if self._readiness.ready or self._readiness.maybe_ready():
            self._readiness.status(f"sync failing: {exc.what}")
        log.warning(
            "%s: sync failed: %s; trying again in %.0f s",
            self.node_id,
            exc.diagnostics(),
            self._next_sync_in(),
        )
        if not isinstance(exc, DatabaseError):
            with contextlib.suppress(Error):
                self._db.record_sync_error(self.node_id, exc.diagnostics())
