"""`farmkeys serve`'s :class:`Service`: the parts of a node made and run together.

It makes the connections and the parts (:mod:`.syncing`, :mod:`.jobs`,
:mod:`.hook`, :mod:`.readiness`, :mod:`.endpoints`), starts them, and stops them
on SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler

from farmkeys.config import Config, RetryConfig
from farmkeys.db import CHANGED_CHANNEL, REQUEST_CHANNEL, ConfigDB
from farmkeys.directory import Directory
from farmkeys.election import Election
from farmkeys.errors import Error
from farmkeys.leader import Leader
from farmkeys.serve.endpoints import Endpoints
from farmkeys.serve.hook import OnChangeHook
from farmkeys.serve.jobs import Jobs
from farmkeys.serve.readiness import Readiness
from farmkeys.serve.sdnotify import Notifier
from farmkeys.serve.syncing import Syncer
from farmkeys.store import Store

if TYPE_CHECKING:
    from farmkeys.publish import Publisher

# The name these lines have always carried, before serve became a package.
log = logging.getLogger("farmkeys.serve")


class Service:
    """One node's `farmkeys serve`."""

    def __init__(self, config: Config, *, stop: threading.Event | None = None) -> None:
        self.config = config
        self.node_id = config.node.id
        self.stop = stop or threading.Event()
        self.store = Store(config.store, node_id=self.node_id, group=config.node.store_group)
        self.directory = Directory(config.directory, config.retry)
        # The probe makes one attempt: it reports the directory's state, it does not wait it out.
        self._probe = Directory(config.directory, RetryConfig(total_seconds=0.0))
        self._db, self._leader_db = _connections(config)
        self.election = Election(self._db, node_id=self.node_id, lease=config.lease)
        self.leader = Leader(config, self._leader_db, self.directory, self.election)
        self.notifier = Notifier.from_environment(os.environ)
        self._readiness = Readiness(
            self.notifier, store=self.store, election=self.election, farm_name=config.farm.name
        )
        hook = OnChangeHook(config.hooks, self._db, store=self.store.path, node_id=self.node_id)
        self._syncer = Syncer(
            config,
            self._db,
            self.directory,
            self.store,
            hook=hook,
            readiness=self._readiness,
            leading=lambda: self.election.leading,
            on_request=lambda: self._jobs.run_rollover_now(),
        )
        self._jobs = Jobs(
            config,
            db=self._db,
            leader_db=self._leader_db,
            election=self.election,
            leader=self.leader,
            directory=self.directory,
            probe=self._probe,
            syncer=self._syncer,
            readiness=self._readiness,
        )
        self._endpoints = Endpoints(
            config,
            self._db,
            self.directory,
            self.store,
            election=self.election,
            syncer=self._syncer,
        )
        self._publisher: Publisher | None = None

    @property
    def scheduler(self) -> BackgroundScheduler:
        return self._jobs.scheduler

    @property
    def syncs(self) -> int:
        return self._syncer.syncs

    @property
    def sync_errors(self) -> int:
        return self._syncer.sync_errors

    # -- lifecycle -------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT (or ``stop`` is set); the exit code.

        Starts whether or not the config DB and the directory can be reached: the
        installed store is served (``/healthz`` "degraded") and the sync retried with
        backoff until they return. Nor does it stop for what the config DB holds (no
        farm, another schema, another farm's name): the config DB is attacker-writable,
        and one forged row must not stop every node; the sync fails, is logged and
        retried, and `farmkeys status` names the problem. Only a configuration it cannot
        use stops it, before this is called (:func:`farmkeys.config.load`).
        """
        if self.config.publish.address is not None:
            self._publisher = self._endpoints.publisher()
        self._install_signal_handlers()
        self._jobs.add(datetime.now(UTC))
        log.info("%s serving farm %s from %s", self.node_id, self.config.farm.name, self.store.path)
        self._jobs.start()
        if self._publisher is not None:
            self._publisher.start()
        try:
            self._syncer.listen(self.stop)
        finally:
            self._shutdown()
        return 0

    def sync(self) -> bool:
        """Sync the store now; True when it succeeded (:meth:`.Syncer.sync`)."""
        return self._syncer.sync()

    def _record_leadership(self) -> None:
        """Record the `lead` event of the current term (:meth:`.Jobs.record_leadership`)."""
        self._jobs.record_leadership()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handle(signum: int, _frame: FrameType | None) -> None:
            log.info("%s received %s; stopping", self.node_id, signal.Signals(signum).name)
            self.stop.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def _shutdown(self) -> None:
        self._readiness.stopping()
        if self._publisher is not None:
            self._publisher.stop()
        self._jobs.shutdown()
        for what, action in (
            ("release the lease", self.election.release),
            ("record the stop", lambda: self._db.stopped_serving(self.node_id)),
        ):
            try:
                action()
            except Error as exc:
                log.warning("%s could not %s: %s", self.node_id, what, exc.what)
        self.close()
        log.info("%s stopped", self.node_id)

    def close(self) -> None:
        """Close every connection this service opened (the lease is left as it is)."""
        self._leader_db.close()
        self._db.dispose()
        self.directory.close()
        self._probe.close()


def _connections(config: Config) -> tuple[ConfigDB, ConfigDB]:
    """The node's two config DB connections: the one every thread shares, and the leader's."""
    node_id = config.node.id
    # The lease must be renewed within its ttl: its connection gives up sooner.
    lease_retry = RetryConfig(
        total_seconds=min(config.retry.total_seconds, config.lease.renew_seconds),
        initial_backoff_seconds=min(0.1, config.lease.renew_seconds / 4),
        max_backoff_seconds=max(0.1, config.lease.renew_seconds / 2),
    )
    idle = config.lease.ttl_seconds
    # The one connection every thread shares; its retries are the lease's, so no thread
    # waits long behind another's reconnection (a failed sync is tried again soon).
    shared = ConfigDB(
        config.database,
        lease_retry,
        idle_in_transaction_seconds=idle,
        listen=(CHANGED_CHANNEL, REQUEST_CHANNEL),
        application_name=f"farmkeys {node_id}",
    )
    # The leader's fenced writes: connected only while this node leads.
    leader = ConfigDB(
        config.database,
        config.retry,
        idle_in_transaction_seconds=idle,
        application_name=f"farmkeys leader {node_id}",
    )
    return shared, leader
