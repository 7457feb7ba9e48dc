"""What serve tells the service manager (systemd ``Type=notify``, :mod:`.sdnotify`).

``READY=1`` once the node serves: the first lease attempt was made, and the store has
synced or, when the first sync failed (the config DB or the directory away), the
installed set can be served as it is,
``STATUS=`` lines describing the node as things change, ``WATCHDOG=1`` from the
main thread, ``STOPPING=1`` on the way out.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

from farmkeys.election import Election
from farmkeys.errors import Error
from farmkeys.serve.sdnotify import Notifier
from farmkeys.store import Manifest, Store
from farmkeys.store.usable import installed_problems


def readable_manifest(store: Store) -> Manifest | None:
    """The store's installed manifest; None when nothing is installed or it cannot be read."""
    try:
        return store.manifest()
    except Error:
        return None


class Readiness:
    """One node's notifications to its service manager, and when it is ready."""

    def __init__(
        self, notifier: Notifier, *, store: Store, election: Election, farm_name: str
    ) -> None:
        self.notifier = notifier
        self._store = store
        self._election = election
        self._farm_name = farm_name
        self._lock = threading.Lock()
        self._synced_once = False
        self._sync_failed = False  # a sync was tried and failed; the installed set may do
        self._joined = False  # the first lease attempt was made
        self._ready = False
        self._watchdog_at = 0.0

    @property
    def address(self) -> str | bytes | None:
        """The manager's socket; None outside systemd."""
        return self.notifier.address

    @property
    def ready(self) -> bool:
        """READY=1 was sent."""
        return self._ready

    def synced(self) -> None:
        """The store has synced once."""
        self._synced_once = True

    def sync_failed(self) -> None:
        """A sync failed: READY may be sent on the installed set alone."""
        self._sync_failed = True

    def joined(self) -> None:
        """The first lease attempt was made (whatever its outcome)."""
        self._joined = True

    def maybe_ready(self) -> bool:
        """Send READY=1 once the first lease attempt was made and the store has synced or,
        after a failed sync, holds a set it can serve; True when this call sent it."""
        with self._lock:
            if self._ready or not self._joined:
                return False
            if not (self._synced_once or (self._sync_failed and self._serviceable())):
                return False
            self._ready = True
        self.notifier.ready(self.describe())
        return True

    def _serviceable(self) -> bool:
        try:
            installed = self._store.verify_installed()
        except Error:
            return False
        return not installed_problems(installed, None, now=datetime.now(UTC))

    def describe(self) -> str:
        """The node in one line, for ``STATUS=``."""
        manifest = readable_manifest(self._store)
        generation = (
            "nothing installed" if manifest is None else f"generation {manifest.generation}"
        )
        election = self._election
        role = f"leading, term {election.term}" if election.leading else "following"
        return f"farm {self._farm_name}: {generation} installed; {role}"

    def status(self, text: str) -> None:
        self.notifier.status(text)

    def watchdog(self) -> None:
        """WATCHDOG=1 when the manager asked for it and half its timeout has passed."""
        interval = self.notifier.watchdog_interval_seconds
        if interval is not None and time.monotonic() - self._watchdog_at >= interval:
            self._watchdog_at = time.monotonic()
            self.notifier.watchdog()

    def stopping(self) -> None:
        self.notifier.stopping()
