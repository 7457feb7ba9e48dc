"""`farmkeys serve`: the long-lived node service.

Every node runs one. It

- keeps its store in step with the farm: it LISTENs on the config DB and
  re-syncs within a second of a change, and polls every ``node.poll_seconds``
  in case a notification was lost (a reconnect, a restarted server); a sync
  that failed is tried again after 1, 2, 4 ... s (at most 30 s or the poll),
  so a change it was told about is never left waiting for the next poll;
- competes for the leader lease, renewing it every ``lease.renew_seconds``,
  and heartbeats so `status` shows it is alive;
- while it leads, runs the rollover check every
  ``policy.rollover_interval_seconds`` and answers `farmkeys rollover`
  requests, each write fenced by the lease term;
- after its store changed, runs ``hooks.on_change`` so the federation service
  can reload;
- with ``publish.listen``, answers the SAML metadata, the JWKS, ``/metrics`` and
  ``/healthz`` over HTTP (:mod:`farmkeys.publish`, :mod:`farmkeys.metrics`);
- under systemd (``Type=notify``), reports ``READY=1`` once it has synced and
  joined the election, ``STATUS=`` lines, and ``WATCHDOG=1`` (:mod:`farmkeys.sdnotify`).

Threads: the main thread listens and syncs; APScheduler's background
scheduler runs the lease, directory-probe and rollover jobs; the HTTP
endpoints run in threads of their own. They share one config DB connection
(LISTEN, heartbeat, lease attempts, sync reads, status for ``/metrics``),
each statement or transaction holding it only while it runs: a following
node holds one connection, so a farm of a hundred nodes fits a stock
PostgreSQL. Only the leader's fenced writes take a second connection, made
when it starts leading and closed when it stops. The directory (and its
in-memory key cache) is shared.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from apscheduler.schedulers.background import BackgroundScheduler

from farmkeys import sync as node_sync
from farmkeys.config import Config, RetryConfig
from farmkeys.db import CHANGED_CHANNEL, REQUEST_CHANNEL, ConfigDB
from farmkeys.directory import Directory
from farmkeys.election import Election
from farmkeys.errors import DatabaseError, DirectoryError, Error, LeaseLostError
from farmkeys.formats import fetch_record
from farmkeys.leader import Leader
from farmkeys.sdnotify import Notifier
from farmkeys.store import Installed, Manifest, Store

if TYPE_CHECKING:
    from farmkeys import metrics
    from farmkeys.publish import Health, Publisher
    from farmkeys.status import FarmStatus

log = logging.getLogger(__name__)

# libpq's own secrets, withheld from the on_change hook like every FARMKEYS_* variable.
_HOOK_WITHHELD = frozenset({"PGPASSWORD", "PGPASSFILE", "PGSERVICEFILE"})


def hook_environment(
    environ: Mapping[str, str], *, store: Path, changed: Sequence[str]
) -> dict[str, str]:
    """The environment of ``hooks.on_change``: this process's, without farmkeys' own
    settings (FARMKEYS_*, which may carry the DSN or the directory password) and libpq's
    secrets, plus ``FARMKEYS_STORE`` and ``FARMKEYS_CHANGED`` (the new thumbprints)."""
    kept = {
        k: v
        for k, v in environ.items()
        if k not in _HOOK_WITHHELD and not k.startswith("FARMKEYS_")
    }
    return {**kept, "FARMKEYS_STORE": str(store), "FARMKEYS_CHANGED": " ".join(changed)}


# How often the main thread wakes to notice a stop request while it waits.
_WAKE_SECONDS = 0.5
# The directory probe binds afresh each time: at most this often, however short the renewal
# (fifty nodes renewing every half second would otherwise bind a hundred times a second).
_PROBE_MIN_SECONDS = 3.0
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


def node_health(
    installed: Installed | None,
    sync_error: Error | None,
    *,
    listening: bool,
    now: datetime,
    store_error: Error | None = None,
) -> tuple[bool, dict[str, object]]:
    """What ``/healthz`` answers: (healthy, its JSON body).

    Health follows what this node can serve, never what the config DB claims: the
    config DB is attacker-writable, and one forged row (a zeroed farm state MAC) makes
    every node's sync refuse at once; were that a 503, a load balancer would drain the
    whole farm although each node still serves its intact set. So unhealthy (503,
    ``failing``) only when the node itself cannot serve: ``store_error`` (the store
    cannot be read), nothing installed (``installed`` None), an installed file that no
    longer holds what the manifest records (removed, changed, a role or fixed link gone),
    or an expired installed signing primary. A failed or refused sync, and a config DB
    or directory that is away, are ``degraded`` and healthy, the problem named: the
    installed set still signs, and `farmkeys status` is what alerts."""
    problems: list[str] = []
    healthy = True
    manifest = None if installed is None else installed.manifest
    if store_error is not None:
        healthy = False
        problems.append(f"the store cannot be read: {store_error.what}")
    elif installed is None:
        healthy = False
        problems.append("nothing is installed; run `farmkeys sync`")
    else:
        for entry in installed.manifest.certificates:
            if (entry.purpose, entry.thumbprint) not in installed.intact:
                healthy = False
                problems.append(
                    f"the installed {entry.purpose} {entry.role} {entry.thumbprint} no longer"
                    " matches the store's manifest (a file removed or changed)"
                )
            if (entry.purpose, entry.role) == ("signing", "primary") and now >= entry.not_after:
                healthy = False
                problems.append(f"the installed signing primary {entry.thumbprint} has expired")
        if healthy and not installed.complete:
            healthy = False
            problems.append("the store's role or fixed links are not the installed set's")
    if sync_error is not None:
        if isinstance(sync_error, DatabaseError | DirectoryError):
            problems.append(f"the last sync failed: {sync_error.what}")
        else:
            serving = f"; serving generation {manifest.generation}" if healthy and manifest else ""
            problems.append(f"the last sync refused the farm's set: {sync_error.what}{serving}")
    if not listening:
        problems.append("not connected to the config DB")
    status = "failing" if not healthy else "degraded" if problems else "ok"
    return healthy, {
        "status": status,
        "generation": None if manifest is None else manifest.generation,
        "problems": problems,
    }


def _utcnow() -> datetime:
    return datetime.now(UTC)


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
        # The lease must be renewed within its ttl: its connection gives up sooner.
        lease_retry = RetryConfig(
            total_seconds=min(config.retry.total_seconds, config.lease.renew_seconds),
            initial_backoff_seconds=min(0.1, config.lease.renew_seconds / 4),
            max_backoff_seconds=max(0.1, config.lease.renew_seconds / 2),
        )
        idle = config.lease.ttl_seconds
        # The one connection every thread shares; its retries are the lease's, so no thread
        # waits long behind another's reconnection (a failed sync is tried again soon).
        self._db = ConfigDB(
            config.database,
            lease_retry,
            idle_in_transaction_seconds=idle,
            listen=(CHANGED_CHANNEL, REQUEST_CHANNEL),
            application_name=f"farmkeys {self.node_id}",
        )
        # The leader's fenced writes: connected only while this node leads.
        self._leader_db = ConfigDB(
            config.database,
            config.retry,
            idle_in_transaction_seconds=idle,
            application_name=f"farmkeys leader {self.node_id}",
        )
        self._led_term: int | None = None  # the last term recorded as a `lead` event
        self.election = Election(self._db, node_id=self.node_id, lease=config.lease)
        self.leader = Leader(config, self._leader_db, self.directory, self.election)
        self._renewed_at = 0.0
        self._directory_error: str | None = None
        self._group: uuid.UUID | None = None  # the farm's DKM group, known after a sync
        self._fetch_keys: tuple[uuid.UUID, ...] = ()  # master keys the last sync opened with
        self._fetch_macs: dict[uuid.UUID, bytes] = {}  # the fetch MAC key derived, by its key
        self._failed_syncs = 0  # in a row; the next sync is retried sooner than the poll
        self._sync_error: Error | None = None  # the last sync's, None when it succeeded
        self._listening = False  # the config DB listener is connected
        self.notifier = Notifier.from_environment(os.environ)
        self._ready_lock = threading.Lock()
        self._synced_once = False
        self._joined = False  # the first lease attempt was made
        self._ready = False
        self._watchdog_at = 0.0
        self.syncs = 0
        self.sync_errors = 0
        self._publisher: Publisher | None = None
        self._scheduling = threading.Lock()  # jobs changing jobs, against the shutdown
        self._stopping = False
        self.scheduler = BackgroundScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )

    # -- lifecycle -------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT (or ``stop`` is set); the exit code.

        Refuses to start (raising) on a config DB without a farm or with an
        older schema: a service manager restarting it is the right retry.
        """
        self._db.connection(self.config.retry)  # at start-up, wait out a busy server
        self._db.require_farm()
        if self.config.publish.address is not None:
            self._publisher = self._make_publisher()
        self._install_signal_handlers()
        now = _utcnow()
        renew = self.config.lease.renew_seconds
        jobs = (
            ("lease", self._lease_tick, renew, now),
            ("directory", self._probe_tick, max(renew, _PROBE_MIN_SECONDS), now),
            ("rollover", self._rollover_tick, self.config.policy.rollover_interval_seconds, None),
        )
        for job_id, tick, seconds, first in jobs:
            kwargs = {} if first is None else {"next_run_time": first}
            self.scheduler.add_job(tick, "interval", id=job_id, seconds=seconds, **kwargs)
        log.info("%s serving farm %s from %s", self.node_id, self.config.farm.name, self.store.path)
        self.scheduler.start()
        if self._publisher is not None:
            self._publisher.start()
        try:
            self._listen()
        finally:
            self._shutdown()
        return 0

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handle(signum: int, _frame: FrameType | None) -> None:
            log.info("%s received %s; stopping", self.node_id, signal.Signals(signum).name)
            self.stop.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def _shutdown(self) -> None:
        self.notifier.stopping()
        if self._publisher is not None:
            self._publisher.stop()
        with self._scheduling:
            self._stopping = True
        self.scheduler.shutdown(wait=True)
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

    # -- listening and syncing (main thread) ---------------------------------------------

    def _listen(self) -> None:
        next_poll = 0.0  # sync at once
        seen = 0  # the connection count at the last catch-up
        while not self.stop.is_set():
            self._watchdog()
            if time.monotonic() >= next_poll:
                self.sync()
                next_poll = time.monotonic() + self._next_sync_in()
            wait = max(0.0, min(_WAKE_SECONDS, next_poll - time.monotonic()))
            try:
                notes = self._db.wait(wait)
            except DatabaseError as exc:
                if self._listening:
                    log.warning("%s lost the config DB: %s; reconnecting", self.node_id, exc.what)
                self._listening = False
                self.stop.wait(1.0)
                continue
            self._listening = True
            if self._db.connects != seen:
                # A new connection: whatever was notified while there was none is lost.
                next_poll = 0.0 if seen else next_poll
                seen = self._db.connects
            changed = False
            for note in notes:
                if note.channel == CHANGED_CHANNEL:
                    changed = True  # a burst of notifications is one sync
                elif note.channel == REQUEST_CHANNEL and self.election.leading:
                    self._run_rollover_now()
            if changed:
                self.sync()
                next_poll = min(next_poll, time.monotonic() + self._next_sync_in())

    def _next_sync_in(self) -> float:
        return sync_retry_delay(self._failed_syncs, self.config.node.poll_seconds)

    def sync(self) -> bool:
        """Sync the store now; True when it succeeded. Failures are logged and recorded,
        and counted so the next attempt comes sooner than the poll (:func:`sync_retry_delay`)."""
        before = self._manifest() if self.config.hooks.on_change else None  # for the hook
        try:
            report = node_sync.sync(
                self.config, self._db, self.directory, self.store, now=_utcnow()
            )
        except Error as exc:
            self._sync_error = exc
            self.syncs += 1
            self.sync_errors += 1
            self._failed_syncs += 1
            if self._ready:
                self.notifier.status(f"sync failing: {exc.what}")
            log.warning(
                "%s: sync failed: %s; trying again in %.0f s",
                self.node_id,
                exc.diagnostics(),
                self._next_sync_in(),
            )
            if not isinstance(exc, DatabaseError):
                with contextlib.suppress(Error):
                    self._db.record_sync_error(self.node_id, exc.diagnostics())
            return False
        self.syncs += 1
        self._sync_error = None
        recovered = self._failed_syncs > 0
        self._failed_syncs = 0
        self._group = report.dkm_group
        self._fetch_keys = report.master_keys
        if report.changed:
            self._run_hook(before, report.manifest)
        self._synced_once = True
        if not self._maybe_ready() and (report.changed or recovered) and self.notifier.address:
            self.notifier.status(self._describe())
        return True

    # -- the service manager and the HTTP endpoints ------------------------------------

    def _describe(self) -> str:
        manifest = self._manifest()
        generation = (
            "nothing installed" if manifest is None else f"generation {manifest.generation}"
        )
        role = f"leading, term {self.election.term}" if self.election.leading else "following"
        return f"farm {self.config.farm.name}: {generation} installed; {role}"

    def _maybe_ready(self) -> bool:
        """Send READY=1 once the store is synced and the first lease attempt was made."""
        with self._ready_lock:
            if self._ready or not (self._synced_once and self._joined):
                return False
            self._ready = True
        self.notifier.ready(self._describe())
        return True

    def _watchdog(self) -> None:
        interval = self.notifier.watchdog_interval_seconds
        if interval is not None and time.monotonic() - self._watchdog_at >= interval:
            self._watchdog_at = time.monotonic()
            self.notifier.watchdog()

    def _make_publisher(self) -> Publisher:
        from farmkeys import metrics
        from farmkeys.publish import Publisher

        collector = metrics.FarmCollector(self._farm_status, self._node_view)
        return Publisher(
            self.config.publish,
            self.store,
            record=self._record_fetch,
            metrics=lambda: metrics.render(collector),
            health=self._health,
            clock=_utcnow,
        )

    def _record_fetch(self, rp: str, document: str, thumbprints: Sequence[str]) -> None:
        """Record a relying party's fetch, each thumbprint marked with its fetch MAC under a
        master key the last sync opened blobs with (in memory: no directory request)."""
        group, key = self._group, self._fetch_key()
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
        group = self._group
        for key_id in self._fetch_keys:
            cached = self._fetch_macs.get(key_id)
            if cached is not None:
                return key_id, cached
            if group is None:
                break
            try:
                derived = fetch_record.mac_key(self.directory.master_key(group, key_id), group)
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

        return NodeView(
            node=self.node_id,
            leading=self.election.leading,
            term=self.election.term if self.election.leading else None,
            syncs=self.syncs,
            sync_errors=self.sync_errors,
        )

    def _health(self) -> Health:
        """Whether this node can serve with its installed set (see :func:`node_health`):
        the store is looked at on every request, cheaply (:meth:`Store.verify_installed`)."""
        from farmkeys.publish import Health

        installed: Installed | None = None
        store_error: Error | None = None
        try:
            installed = self.store.verify_installed()
        except Error as exc:
            store_error = exc
        ok, detail = node_health(
            installed,
            self._sync_error,
            listening=self._listening,
            now=_utcnow(),
            store_error=store_error,
        )
        detail |= {"node": self.node_id, "leading": self.election.leading}
        return Health(ok, detail)

    def _manifest(self) -> Manifest | None:
        try:
            return self.store.manifest()
        except Error:
            return None

    def _run_hook(self, before: Manifest | None, after: Manifest) -> None:
        command = self.config.hooks.on_change
        if not command:
            return
        old = before.identity() if before else frozenset()
        changed = sorted({t for (_, _, t) in after.identity() - old})
        env = hook_environment(os.environ, store=self.store.path, changed=changed)
        error: str | None = None
        try:
            done = subprocess.run(
                shlex.split(command),
                env=env,
                timeout=self.config.hooks.timeout_seconds,
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                tail = " ".join((done.stderr or done.stdout).split())[-200:]
                error = f"on_change hook exited {done.returncode}: {tail}"
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            error = f"on_change hook could not run: {exc}"
        if error:
            log.warning("%s: %s", self.node_id, error)
        else:
            log.info("%s: on_change hook ran for %s", self.node_id, " ".join(changed))
        try:
            self._db.record_hook(self.node_id, error=error)
        except Error as exc:
            log.warning("%s could not record the hook's outcome: %s", self.node_id, exc.what)

    # -- scheduled jobs (scheduler threads) ---------------------------------------------

    def _lease_tick(self) -> None:
        was_leading = self.election.leading
        try:
            leading = self.election.try_acquire()
            self._renewed_at = time.monotonic()
        except Error as exc:
            self._joined = True  # it tried: READY does not wait for a config DB that is away
            log.warning("%s cannot renew the lease: %s", self.node_id, exc.diagnostics())
            expired = time.monotonic() - self._renewed_at >= self.config.lease.ttl_seconds
            if was_leading and expired:
                log.warning("%s: the lease has run out unrenewed; stepping down", self.node_id)
                self.election.step_down()
            return
        self._joined = True
        if not leading:
            self._leader_db.close()  # a follower holds one connection
        if not self._maybe_ready() and leading != was_leading:
            self.notifier.status(self._describe())
        if leading and self.election.term != self._led_term:
            # A new term (or one whose `lead` event could not be written yet).
            self._record_leadership()
            self._run_rollover_now()
        elif leading and self._requests_pending():
            # A request whose notification met a running check: answer it now.
            self._run_rollover_now()
        try:
            self._db.heartbeat(
                self.node_id,
                directory_error=self._directory_error,
                directory_server=self.directory.last_server,
            )
        except Error as exc:
            log.warning("%s cannot heartbeat: %s", self.node_id, exc.diagnostics())

    def _requests_pending(self) -> bool:
        try:
            return self._db.requests_pending()
        except Error:
            return False

    def _record_leadership(self) -> None:
        """The `lead` event that opens a term, written under the fence like any leader write,
        so a process that lost the term meanwhile cannot write it late."""
        term = self.election.term
        try:
            with self.election.fenced(self._leader_db) as fence:
                fence.tx.audit(
                    node=self.node_id,
                    term=fence.term,
                    action="lead",
                    detail=f"{self.election.identity} took the lease",
                )
        except LeaseLostError as exc:
            log.warning("%s: lead event refused by the fence: %s", self.node_id, exc.what)
            return
        except Error as exc:
            log.warning("%s could not record its leadership: %s", self.node_id, exc.what)
            return  # tried again at the next renewal
        self._led_term = term

    def _probe_tick(self) -> None:
        group = self._group
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

    def _run_rollover_now(self) -> None:
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
            if not self.election.leading:
                self._leader_db.close()  # stepped down meanwhile: back to one connection

    def _rollover(self) -> None:
        if not self.election.leading:
            return
        try:
            self.leader.tick()
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
