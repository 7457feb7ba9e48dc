"""Relying parties' fetch records, written off the request path.

A fetch with ``?rp=<name>`` is recorded in the config DB (the ``require_fetch`` gate and
`status` read it). The write may wait for the config DB: for the length of its retries
during an outage. Were it written by the handler that answers the fetch, a few relying
parties polling during an outage would hold every handler thread, and ``/healthz``
would be answered 503 from a full pool: the load balancer would drain a node that
serves. So a handler only hands the record to one writer thread and answers at once.

Pending records are kept one per relying party (the latest fetch wins: it names the
keys the relying party has now), so the backlog is bounded by ``[publish]
relying_parties`` however many fetches arrive while the config DB is away.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from farmkeys.errors import Error

log = logging.getLogger("farmkeys.publish")

Record = Callable[[str, str, Sequence[str]], None]


class FetchRecorder:
    """One thread writing fetch records through ``record(rp, document, thumbprints)``;
    ``failed(rp)`` is called after a write that raised, so a later fetch tries again."""

    def __init__(self, record: Record, *, failed: Callable[[str], None]) -> None:
        self._record = record
        self._failed = failed
        self._pending: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._changed = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="fetch-recorder", daemon=True)

    def submit(self, rp: str, document: str, thumbprints: Sequence[str]) -> None:
        """Record this fetch soon; never waits for the config DB."""
        with self._changed:
            self._pending[rp] = (document, tuple(thumbprints))
            self._changed.notify()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is pending (for at most ``timeout`` seconds), then end the thread."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def idle(self, timeout: float) -> bool:
        """Wait until nothing is pending or being written; False after ``timeout``."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._stopping)
                if not self._pending:
                    return  # stopping, and nothing left to write
                rp, (document, thumbprints) = self._pending.popitem()
                self._busy = True
            try:
                self._record(rp, document, thumbprints)
            except Error as exc:
                self._failed(rp)
                log.warning("cannot record relying party %s's fetch: %s", rp, exc.diagnostics())
            except Exception:  # a bug must not end the writer: the next fetch tries again
                self._failed(rp)
                log.exception("recording relying party %s's fetch failed", rp)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()
