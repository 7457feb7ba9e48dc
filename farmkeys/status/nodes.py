"""The nodes as status shows them, and what each one's row says is wrong with it.

Every node row is unauthenticated: what it says becomes a warning at most."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from farmkeys.status.document import NodeStatus
from farmkeys.status.problems import Problems


def node_statuses(documents: Sequence[dict[str, Any]]) -> tuple[list[NodeStatus], set[str]]:
    """The nodes of :meth:`farmkeys.db.ConfigDB.node_documents`, and the ids of those
    whose heartbeat is too old (``silent``) or whose serve stopped too long ago."""
    nodes = [NodeStatus.from_document(doc) for doc in documents]
    late = {doc["id"] for doc in documents if doc["silent"] or doc.get("stopped_long")}
    return nodes, late


def check_nodes(
    nodes: Sequence[NodeStatus],
    silent: Collection[str],
    live_keys: Collection[str],
    problems: Problems,
) -> None:
    """The problems each node's row shows; ``live_keys`` are the master keys the live
    certificates are sealed under, which every node in sync should have opened."""
    if not nodes:
        problems.add("warning", "no node has synced yet; run `farmkeys sync` on each node")
    for node in nodes:
        _check_node(node, node.id in silent, live_keys, problems)


def _check_node(
    node: NodeStatus, silent: bool, live_keys: Collection[str], problems: Problems
) -> None:
    name = node.id
    if not node.in_sync:
        problems.add("warning", f"node {name} has not installed the live certificate set")
    if node.last_error:
        problems.add("warning", f"node {name}'s last sync failed: {node.last_error}")
    if silent and node.serving == "stopped":
        problems.add(
            "warning",
            f"node {name}'s serve stopped at {node.stopped_at} and has not run since: start"
            f" it again, or remove the node with `farmkeys nodes remove {name}`",
        )
    elif silent:
        problems.add("warning", f"node {name} has not been heard from since {node.heartbeat_at}")
    if node.directory_error and node.heartbeat_at is not None:
        problems.add("warning", f"node {name} cannot reach the directory: {node.directory_error}")
    if node.hook_error:
        problems.add("warning", f"node {name}'s on_change hook failed: {node.hook_error}")
    unconfirmed = sorted(set(live_keys) - set(node.master_keys))
    if node.in_sync and unconfirmed and node.heartbeat_at is not None and not node.last_error:
        problems.add(
            "warning",
            f"node {name} has not yet opened the live blobs under master key"
            f" {', '.join(unconfirmed)}",
        )
