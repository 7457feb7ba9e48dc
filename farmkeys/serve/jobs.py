"""serve's jobs on APScheduler's background scheduler: the lease, the directory probe and
the leader's rollover check.

- ``lease``, every ``lease.renew_seconds``: takes or renews the lease; on a term
  not yet recorded, audits ``lead`` (fenced) and runs the rollover check at
  once; then heartbeats. A follower closes the leader's connection.
- ``directory``, as often but at most every 3 s: probes the directory once the
  node has synced; the result goes out with the next heartbeat.
- ``rollover``, every ``policy.rollover_interval_seconds``, and at once when
  asked: only while leading, answers requests and runs the rollover check.

No job changes the scheduler once its shutdown has begun: APScheduler's
shutdown holds its job-store lock while it waits for the running jobs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from farmkeys.config import Config
from farmkeys.db import ConfigDB
from farmkeys.directory import Directory
from farmkeys.election import Election
from farmkeys.errors import Error, LeaseLostError
from farmkeys.leader import Leader
from farmkeys.serve.readiness import Readiness
from farmkeys.serve.syncing import Syncer

# The name these lines have always carried, before serve became a package.
log = logging.getLogger("farmkeys.serve")

# The directory probe binds afresh each time: at most this often, however short the renewal
# (fifty nodes renewing every half second would otherwise bind a hundred times a second).
_PROBE_MIN_SECONDS = 3.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Jobs:
    """The scheduler and its three jobs, for one node."""

    def __init__(
        self,
        config: Config,
        *,
        db: ConfigDB,
        leader_db: ConfigDB,
        election: Election,
        leader: Leader,
        directory: Directory,
        probe: Directory,
        syncer: Syncer,
        readiness: Readiness,
    ) -> None:
        self.config = config
        self.node_id = config.node.id
        self._db = db
        self._leader_db = leader_db
        self._election = election
        self._leader = leader
        self._directory = directory
        self._probe = probe
        self._syncer = syncer
        self._readiness = readiness
        self._led_term: int | None = None  # the last term recorded as a `lead` event
        self._renewed_at = 0.0
        self._directory_error: str | None = None
        self._scheduling = threading.Lock()  # jobs changing jobs, against the shutdown
        self._stopping = False
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )

    def add(self, now: datetime) -> None:
        """Add the three jobs, the lease and the probe first due at ``now``."""
        renew = self.config.lease.renew_seconds
        jobs: tuple[tuple[str, Callable[[], None], float, datetime | None], ...] = (
            ("lease", self._lease_tick, renew, now),
            ("directory", self._probe_tick, max(renew, _PROBE_MIN_SECONDS), now),
            ("rollover", self._rollover_tick, self.config.policy.rollover_interval_seconds, None),
        )
        for job_id, tick, seconds, first in jobs:
            kwargs = {} if first is None else {"next_run_time": first}
            self.scheduler.add_job(tick, "interval", id=job_id, seconds=seconds, **kwargs)

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        """Stop the scheduler, waiting for the running jobs; no job is moved from now on."""
        with self._scheduling:
            self._stopping = True
        self.scheduler.shutdown(wait=True)

    # -- the lease -------------------------------------------------------------------------

    def _lease_tick(self) -> None:
        election = self._election
        was_leading = election.leading
        try:
            leading = election.try_acquire()
            self._renewed_at = time.monotonic()
        except Error as exc:
            # It tried: READY does not wait for a config DB that is away.
            self._readiness.joined()
            log.warning("%s cannot renew the lease: %s", self.node_id, exc.diagnostics())
            expired = time.monotonic() - self._renewed_at >= self.config.lease.ttl_seconds
            if was_leading and expired:
                log.warning("%s: the lease has run out unrenewed; stepping down", self.node_id)
                election.step_down()
            return
        self._readiness.joined()
        if not leading:
            self._leader_db.close()  # a follower holds one connection
        if not self._readiness.maybe_ready() and leading != was_leading:
            self._readiness.status(self._readiness.describe())
        if leading and election.term != self._led_term:
            # A new term (or one whose `lead` event could not be written yet).
            self.record_leadership()
            self.run_rollover_now()
        elif leading and self._requests_pending():
            # A request whose notification met a running check: answer it now.
            self.run_rollover_now()
        self._heartbeat()

    def _heartbeat(self) -> None:
        try:
            self._db.heartbeat(
                self.node_id,
                directory_error=self._directory_error,
                directory_server=self._directory.last_server,
            )
        except Error as exc:
            log.warning("%s cannot heartbeat: %s", self.node_id, exc.diagnostics())

    def _requests_pending(self) -> bool:
        try:
            return self._db.requests_pending()
        except Error:
            return False

    def record_leadership(self) -> None:
        """The `lead` event that opens a term, written under the fence like any leader write,
        so a process that lost the term meanwhile cannot write it late."""
        election = self._election
        term = election.term
        try:
            with election.fenced(self._leader_db) as fence:
                fence.tx.audit(
                    node=self.node_id,
                    term=fence.term,
                    action="lead",
                    detail=f"{election.identity} took the lease",
                )
        except LeaseLostError as exc:
            log.warning("%s: lead event refused by the fence: %s", self.node_id, exc.what)
            return
        except Error as exc:
            log.warning("%s could not record its leadership: %s", self.node_id, exc.what)
            return  # tried again at the next renewal
        self._led_term = term

    # -- the directory probe ---------------------------------------------------------------

    def _probe_tick(self) -> None:
        group = self._syncer.group
        if group is None:
            return  # not synced yet: nothing to look for
        try:
            self._probe.current_key_id(group)
            self._directory_error = None
        except Error as exc:
            if self._directory_error is None:
                log.warning("%s cannot reach the directory: %s", self.node_id, exc.what)
            self._directory_error = exc.what
        finally:
            self._probe.close()

    # -- the rollover check ----------------------------------------------------------------

    def run_rollover_now(self) -> None:
        self._schedule_rollover(_utcnow())

    def _schedule_rollover(self, at: datetime) -> None:
        """Move the next rollover check to ``at``. Never once the scheduler is shutting
        down: APScheduler's shutdown holds its job-store lock while it waits for the
        running jobs, so a job asking for a job then would wait for ever."""
        with self._scheduling:
            if self._stopping:
                return
            job = self.scheduler.get_job("rollover")
            if job is not None:
                job.modify(next_run_time=at)

    def _rollover_tick(self) -> None:
        try:
            self._rollover()
        finally:
            if not self._election.leading:
                self._leader_db.close()  # stepped down meanwhile: back to one connection

    def _rollover(self) -> None:
        if not self._election.leading:
            return
        try:
            self._leader.tick()
        except LeaseLostError as exc:
            log.warning("%s: write refused by the fence: %s", self.node_id, exc.diagnostics())
        except Error as exc:
            retry_in = min(
                self.config.policy.rollover_interval_seconds, self.config.node.poll_seconds
            )
            log.warning(
                "%s: rollover check failed: %s; retrying in %.0f s",
                self.node_id,
                exc.diagnostics(),
                retry_in,
            )
            self._schedule_rollover(_utcnow() + timedelta(seconds=retry_in))
