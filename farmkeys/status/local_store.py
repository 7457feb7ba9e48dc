"""This node's own store, as status sees it beside the node's row: a store the row says
was installed into that is now missing, empty or older is a problem.

The row is unauthenticated, so what it says is a warning at most; the store is only read.
"""

from __future__ import annotations

from collections.abc import Sequence

from farmkeys.config import Config
from farmkeys.status.document import NodeStatus
from farmkeys.status.problems import Problems
from farmkeys.store import Store


def check_local_store(
    config: Config,
    nodes: Sequence[NodeStatus],
    revoked: Sequence[tuple[str, tuple[str, ...]]],
    problems: Problems,
) -> None:
    """A warning when the row of this node (``node.id``) records an install but its store
    (``node.store``) is missing, empty, unreadable, holds an older generation or has
    forgotten revocations the row says it remembers (``revoked``, by node). Nothing
    when this machine is not a node the config DB knows (an operator's workstation)."""
    mine = [n for n in nodes if n.id == config.node.id]
    if not mine or mine[0].generation is None:
        return
    store = Store(config.store, node_id=config.node.id)
    remembered = [t for node, found in revoked if node == config.node.id for t in found]
    why = store.vanished(store.inspect(), mine[0].generation, remembered)
    if why is not None:
        problems.add(
            "warning",
            f"node {config.node.id}: {why} — find out who moved it and who can write the"
            " folders above it, then run `farmkeys sync`",
        )
