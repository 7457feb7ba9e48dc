"""The ``node`` table: what each node installed, when it was last heard from, and what
it reports (its directory server, its hook's outcome, the revocations it remembers).

A node writes only its own row, and nothing in a row is an instruction to anyone:
`status` shows the rows, and `repair-state` shows the revocations nodes remember.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from typing import Any

from farmkeys import __version__
from farmkeys.db.connection import Connection, Statements
from farmkeys.db.rows import NodeRow, installed_doc


class NodeQueries(Connection):
    def nodes(self) -> list[NodeRow]:
        rows = self.fetch("SELECT * FROM node ORDER BY id")
        return [
            NodeRow(
                id=r["id"],
                last_sync=r["last_sync"],
                last_seen=r["last_seen"],
                generation=r["generation"],
                installed=tuple((i["purpose"], i["role"], i["thumbprint"]) for i in r["installed"]),
                last_error=r["last_error"],
                heartbeat_at=r.get("heartbeat_at"),
                directory_error=r.get("directory_error"),
                directory_server=r.get("directory_server"),
                hook_error=r.get("hook_error"),
                master_keys=tuple(sorted(r.get("master_keys") or (), key=str)),
                state_version=r.get("state_version"),
            )
            for r in rows
        ]

    def node_documents(
        self,
        live: Collection[tuple[str, str, str]],
        *,
        silent_after_seconds: float,
        stopped_after_seconds: float = 3600.0,
    ) -> list[dict[str, Any]]:
        """Every node as `status --json` shows it, built by the server in one statement
        (a farm of a thousand nodes costs milliseconds, not a Python loop over rows):
        ``id``, ``last_sync``, ``last_seen``, ``generation``, ``installed`` (thumbprints
        by purpose and role), ``in_sync`` (exactly ``live`` installed), ``last_error``,
        ``heartbeat_at``, ``directory_error``, ``directory_server``, ``hook_error``,
        ``master_keys``, ``state_version``, ``stopped_at`` (its `serve` stopped cleanly),
        ``version`` (the farmkeys it runs); ``silent``, whether its heartbeat is older than
        ``silent_after_seconds``, and ``stopped_long``, whether it stopped more than
        ``stopped_after_seconds`` ago, by the server's clock. Times are ISO 8601 in UTC."""
        rows = self.fetch(
            "SELECT coalesce(json_agg(json_build_object("
            " 'id', n.id, 'last_sync', n.last_sync, 'last_seen', n.last_seen,"
            " 'generation', n.generation,"
            # record_sync stores both arrays sorted (by purpose, role, thumbprint; by id).
            " 'installed', jsonb_path_query_array(n.installed, '$[*].thumbprint'),"
            " 'in_sync', n.installed @> %(live)s::jsonb AND n.installed <@ %(live)s::jsonb,"
            " 'last_error', n.last_error, 'heartbeat_at', n.heartbeat_at,"
            " 'directory_error', n.directory_error, 'directory_server', n.directory_server,"
            " 'hook_error', n.hook_error, 'master_keys', to_json(n.master_keys),"
            " 'state_version', n.state_version,"
            " 'stopped_at', n.stopped_at, 'version', n.software_version,"
            " 'silent', n.heartbeat_at IS NOT NULL"
            "  AND now() - n.heartbeat_at > make_interval(secs => %(silent)s),"
            " 'stopped_long', n.stopped_at IS NOT NULL"
            "  AND now() - n.stopped_at > make_interval(secs => %(stopped)s))"
            " ORDER BY n.id COLLATE \"C\"), '[]') AS nodes FROM node n",
            {
                "live": installed_doc(live),
                "silent": silent_after_seconds,
                "stopped": stopped_after_seconds,
            },
        )
        return list(rows[0]["nodes"])

    def record_sync(
        self,
        node_id: str,
        *,
        generation: int,
        installed: Sequence[tuple[str, str, str]],
        master_keys: Sequence[uuid.UUID] = (),
        directory_server: str | None = None,
        state_version: int | None = None,
        revoked: Collection[str] = (),
    ) -> None:
        """Record that ``node_id`` now has ``installed`` in its store, and opened the live
        blobs with ``master_keys``; ``directory_server`` is the directory server it last
        bound to (None: it did not need the directory this time); ``state_version`` the
        highest farm state version its store has installed; ``revoked`` the thumbprints
        it remembers as urgently replaced (shown by `repair-state`, never acted on)."""
        doc = installed_doc(installed)
        self.fetch(
            "INSERT INTO node (id, last_sync, last_seen, generation, installed, last_error,"
            " master_keys, directory_server, state_version, revoked, software_version)"
            " VALUES (%(id)s, now(), now(), %(gen)s, %(doc)s, NULL, %(keys)s, %(dc)s, %(sv)s,"
            " %(revoked)s, %(version)s)"
            " ON CONFLICT (id) DO UPDATE SET last_sync = now(), last_seen = now(),"
            " generation = EXCLUDED.generation, installed = EXCLUDED.installed, last_error = NULL,"
            " master_keys = EXCLUDED.master_keys,"
            " directory_server = COALESCE(EXCLUDED.directory_server, node.directory_server),"
            " state_version = COALESCE(EXCLUDED.state_version, node.state_version),"
            " revoked = EXCLUDED.revoked, software_version = EXCLUDED.software_version",
            {
                "version": __version__,
                "revoked": sorted(revoked),
                "id": node_id,
                "gen": generation,
                "doc": doc,
                "keys": sorted(master_keys, key=str),
                "dc": directory_server,
                "sv": state_version,
            },
        )

    def heartbeat(
        self, node_id: str, *, directory_error: str | None, directory_server: str | None = None
    ) -> None:
        """`serve` is alive on ``node_id``; and how, and where, it last saw the directory."""
        self.fetch(
            "INSERT INTO node (id, last_seen, heartbeat_at, directory_error, directory_server,"
            " software_version) VALUES (%s, now(), now(), %s, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET last_seen = now(), heartbeat_at = now(),"
            " stopped_at = NULL, directory_error = EXCLUDED.directory_error,"
            " directory_server = COALESCE(EXCLUDED.directory_server, node.directory_server),"
            " software_version = EXCLUDED.software_version",
            (node_id, directory_error, directory_server, __version__),
        )

    def stopped_serving(self, node_id: str) -> None:
        """`serve` stopped cleanly on ``node_id``: no heartbeat is owed any more, and
        `status` says since when it has not served."""
        self.fetch(
            "UPDATE node SET heartbeat_at = NULL, stopped_at = now() WHERE id = %s", (node_id,)
        )

    def node_seen(self, node_id: str) -> dict[str, Any] | None:
        """``node_id``'s ``last_seen``, ``heartbeat_at``, ``stopped_at`` and the age of its
        last contact in seconds by the server's clock; None when it has no row."""
        rows = self.fetch(
            "SELECT last_seen, heartbeat_at, stopped_at,"
            " extract(epoch FROM now() - coalesce(heartbeat_at, last_seen)) AS age_seconds"
            " FROM node WHERE id = %s",
            (node_id,),
        )
        return rows[0] if rows else None

    def record_hook(self, node_id: str, *, error: str | None) -> None:
        """The outcome of the on_change hook: ``error`` is None when it succeeded."""
        self.fetch(
            "UPDATE node SET hook_error = %s, hook_at = now() WHERE id = %s", (error, node_id)
        )

    def record_sync_error(self, node_id: str, message: str) -> None:
        """Record a failed sync's one-line error, so `status` can show it."""
        self.fetch(
            "INSERT INTO node (id, last_seen, last_error) VALUES (%s, now(), %s)"
            " ON CONFLICT (id) DO UPDATE SET last_seen = now(), last_error = EXCLUDED.last_error",
            (node_id, message),
        )

    def revoked_by_node(self) -> list[tuple[str, tuple[str, ...]]]:
        """Each node and the thumbprints it reports it remembers as urgently replaced."""
        return [
            (str(r["id"]), tuple(str(t) for t in r["revoked"] or ()))
            for r in self.fetch("SELECT id, revoked FROM node ORDER BY id")
        ]


class NodeWrites(Statements):
    def remove_node(self, node_id: str) -> dict[str, Any] | None:
        """Delete ``node_id``'s row, in the transaction that audits it; what it said
        (``last_seen``, ``heartbeat_at``, ``stopped_at``, and the age of ``last_seen`` in
        seconds by the server's clock), or None when there was none."""
        rows = self.execute(
            "DELETE FROM node WHERE id = %s RETURNING last_seen,"
            " extract(epoch FROM now() - last_seen) AS age_seconds, heartbeat_at, stopped_at",
            (node_id,),
        )
        return rows[0] if rows else None
