"""serve's HTTP side (``publish.listen``): the :class:`~farmkeys.publish.Publisher` and what
it asks of the node.

The documents come from the store; the rest from the node: a relying party's
fetch recorded with its fetch MACs (under a master key the last sync opened
blobs with, in memory: no directory request), the farm's status and this
process's counters for ``/metrics``, and ``/healthz`` (:func:`.node_health`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from farmkeys.config import Config
from farmkeys.db import ConfigDB
from farmkeys.directory import Directory
from farmkeys.election import Election
from farmkeys.errors import DirectoryError, Error
from farmkeys.formats import fetch_record
from farmkeys.serve.health import node_health
from farmkeys.serve.syncing import Syncer
from farmkeys.store import Installed, Store

if TYPE_CHECKING:
    from farmkeys import metrics
    from farmkeys.publish import Health, Publisher
    from farmkeys.status import FarmStatus


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Endpoints:
    """What one node's HTTP endpoints answer beyond the documents."""

    def __init__(
        self,
        config: Config,
        db: ConfigDB,
        directory: Directory,
        store: Store,
        *,
        election: Election,
        syncer: Syncer,
    ) -> None:
        self.config = config
        self.node_id = config.node.id
        self._db = db
        self._directory = directory
        self._store = store
        self._election = election
        self._syncer = syncer
        self._fetch_macs: dict[uuid.UUID, bytes] = {}  # the fetch MAC key derived, by its key

    def publisher(self) -> Publisher:
        """The HTTP server of ``publish.listen`` (not started)."""
        from farmkeys import metrics
        from farmkeys.publish import Publisher

        collector = metrics.FarmCollector(self._farm_status, self._node_view)
        return Publisher(
            self.config.publish,
            self._store,
            record=self.record_fetch,
            metrics=lambda: metrics.render(collector),
            health=self.health,
            clock=_utcnow,
        )

    def record_fetch(self, rp: str, document: str, thumbprints: Sequence[str]) -> None:
        """Record a relying party's fetch, each thumbprint marked with its fetch MAC under a
        master key the last sync opened blobs with (in memory: no directory request)."""
        group, key = self._syncer.group, self._fetch_key()
        if group is None or key is None:
            self._db.record_fetch(
                rp, node_id=self.node_id, document=document, thumbprints=thumbprints
            )
            return
        key_id, mac_key = key
        macs = [
            fetch_record.sign(mac_key, farm=group, relying_party=rp, thumbprint=t)
            for t in thumbprints
        ]
        self._db.record_fetch(
            rp,
            node_id=self.node_id,
            document=document,
            thumbprints=thumbprints,
            macs=macs,
            mac_key=key_id,
        )

    def _fetch_key(self) -> tuple[uuid.UUID, bytes] | None:
        """A fetch MAC key and the id of the master key it comes from; None if none is known
        (the fetch is then recorded unmarked: it only delays a held promotion)."""
        group = self._syncer.group
        for key_id in self._syncer.master_keys:
            cached = self._fetch_macs.get(key_id)
            if cached is not None:
                return key_id, cached
            if group is None:
                break
            try:
                derived = fetch_record.mac_key(self._directory.master_key(group, key_id), group)
            except DirectoryError:
                continue
            self._fetch_macs = {key_id: derived}
            return key_id, derived
        return None

    def _farm_status(self) -> FarmStatus:
        from farmkeys.status import read_farm_status

        return read_farm_status(self.config, self._db, None, now=_utcnow())

    def _node_view(self) -> metrics.NodeView:
        from farmkeys.metrics import NodeView

        election = self._election
        return NodeView(
            node=self.node_id,
            leading=election.leading,
            term=election.term if election.leading else None,
            syncs=self._syncer.syncs,
            sync_errors=self._syncer.sync_errors,
        )

    def health(self) -> Health:
        """Whether this node can serve with its installed set (see :func:`.node_health`):
        the store is looked at on every request, cheaply (:meth:`Store.verify_installed`)."""
        from farmkeys.publish import Health

        installed: Installed | None = None
        store_error: Error | None = None
        try:
            installed = self._store.verify_installed()
        except Error as exc:
            store_error = exc
        ok, detail = node_health(
            installed,
            self._syncer.last_error,
            listening=self._syncer.listening,
            now=_utcnow(),
            store_error=store_error,
        )
        detail |= {"node": self.node_id, "leading": self._election.leading}
        return Health(ok, detail)
