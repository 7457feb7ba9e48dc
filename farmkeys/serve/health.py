"""What ``/healthz`` answers: whether this node can serve with its installed set.

Pure: the installed set, the last sync's error and the listener's state are passed
in, and the time.
"""

from __future__ import annotations

from datetime import datetime

from farmkeys.errors import DatabaseError, DirectoryError, Error
from farmkeys.store import Installed
from farmkeys.store.usable import installed_problems


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
    problems = installed_problems(installed, store_error, now=now)
    healthy = not problems
    manifest = None if installed is None else installed.manifest
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
