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
  joined the election, ``STATUS=`` lines, and ``WATCHDOG=1`` (:mod:`farmkeys.serve.sdnotify`).

Threads: the main thread listens and syncs; APScheduler's background
scheduler runs the lease, directory-probe and rollover jobs; the HTTP
endpoints run in threads of their own. They share one config DB connection
(LISTEN, heartbeat, lease attempts, sync reads, status for ``/metrics``),
each statement or transaction holding it only while it runs: a following
node holds one connection, so a farm of a hundred nodes fits a stock
PostgreSQL. Only the leader's fenced writes take a second connection, made
when it starts leading and closed when it stops. The directory (and its
in-memory key cache) is shared.

The parts, each its own module, composed by :class:`~farmkeys.serve.service.Service`:

- :mod:`~farmkeys.serve.syncing`: the main thread's listen loop and its syncs;
- :mod:`~farmkeys.serve.jobs`: the scheduler's jobs (the lease, the directory probe, the
  leader's rollover check);
- :mod:`~farmkeys.serve.hook`: ``hooks.on_change``;
- :mod:`~farmkeys.serve.endpoints` and :mod:`~farmkeys.serve.health`: what the HTTP
  endpoints ask of the node, and ``/healthz``;
- :mod:`~farmkeys.serve.readiness` and :mod:`~farmkeys.serve.sdnotify`: the service
  manager (``READY=1``, ``STATUS=``, ``WATCHDOG=1``) and its protocol.
"""

from __future__ import annotations

from farmkeys.serve.health import node_health
from farmkeys.serve.hook import hook_environment
from farmkeys.serve.service import Service
from farmkeys.serve.syncing import sync_retry_delay

__all__ = ["Service", "hook_environment", "node_health", "sync_retry_delay"]
