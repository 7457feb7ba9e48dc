"""The current master key, as the leader holds it in memory.

Which key is current is the authenticated farm state record's: the key it is sealed
under, which the leader chose when it last wrote it. The ``master_key`` table's
``current`` is followed only for a farm without a record; a table that names another key
is a DB writer's edit and is not followed (`status` flags it). The key's bytes come from
the directory once per process and stay in memory; if the directory cannot be read, the
last key read stays in use (still valid: a blob sealed under it opens as well as any).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from farmkeys import policy
from farmkeys.db import ConfigDB, Farm
from farmkeys.directory import Directory
from farmkeys.errors import DirectoryError, FarmStateError
from farmkeys.formats import farm_state

log = logging.getLogger(__name__)


class CurrentKey:
    """The current master key (id and bytes) in memory, or why it could not be read."""

    def __init__(self, db: ConfigDB, directory: Directory) -> None:
        self._db = db
        self._directory = directory
        self.known: tuple[uuid.UUID, bytes] | None = None
        self._error: DirectoryError | None = None
        # The key the farm state record named at the last refresh (None: no record, or one
        # that does not parse), kept for prefetch_record_key: one read of the record a tick.
        self._record_named: uuid.UUID | None = None
        self._record_read = False

    @property
    def id(self) -> uuid.UUID | None:
        return None if self.known is None else self.known[0]

    def refresh(self, farm: Farm, *, adopt: Callable[[Farm], uuid.UUID]) -> None:
        """Learn the current master key before any transaction opens. ``adopt`` records
        the keys of a farm made before master keys were recorded, and names its current.

        Directory I/O never happens while the lease row is locked, except the master-key
        writes themselves (:mod:`farmkeys.leader.master_keys`)."""
        try:
            current = policy.current_key(self._db.master_keys())
            key_id = current.id if current is not None else adopt(farm)
            key_id = self._record_key(key_id)
            if self.known is None or self.known[0] != key_id:
                self.known = (key_id, self._directory.master_key(farm.dkm_group, key_id))
            self._error = None
        except DirectoryError as exc:
            if self.known is None:
                self._error = exc
            elif self._error is None:  # once per outage
                log.warning(
                    "directory unavailable; sealing under the last master key read: %s", exc.what
                )
                self._error = exc

    def _record_key(self, table_current: uuid.UUID) -> uuid.UUID:
        """The key the farm state record is under (the fence verifies the record before
        anything is built on it); ``table_current`` for a farm without a record."""
        stored = self._db.stored_state()
        self._record_read, self._record_named = True, None
        if stored is None:
            return table_current
        try:
            named = farm_state.parse(stored.body).master_key
        except FarmStateError:
            return table_current  # the fenced check refuses it
        self._record_named = named
        if named != table_current:
            log.warning(
                "the master_key table names %s current, but the farm state record is under %s:"
                " sealing under %s",
                table_current,
                named,
                named,
            )
        return named

    def prefetch_record_key(self, farm: Farm) -> None:
        """Read (into the directory's cache) the key the farm state record names, so the
        fence can verify the record without directory I/O under the lease row's lock."""
        try:
            if self._record_read:  # the refresh just before read the record: use that
                named = self._record_named
            else:
                stored = self._db.stored_state()
                named = None if stored is None else farm_state.parse(stored.body).master_key
            if named is not None and (self.known is None or self.known[0] != named):
                self._directory.master_key(farm.dkm_group, named)
        except (FarmStateError, DirectoryError):
            pass  # the fenced check reports it
        finally:
            self._record_read = False

    def current(self) -> tuple[uuid.UUID, bytes]:
        """The current master key in memory, or the error that kept it from being read."""
        if self.known is None:
            raise self._error or DirectoryError(
                "the current master key has not been read", "check the directory"
            )
        return self.known

    def bytes_of(self, farm: Farm, key_id: uuid.UUID) -> bytes:
        """A master key's bytes: the current one from memory, another from the directory
        (which caches what it read)."""
        if self.known is not None and self.known[0] == key_id:
            return self.known[1]
        return self._directory.master_key(farm.dkm_group, key_id)
