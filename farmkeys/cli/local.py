"""What a command opens on this node itself: its store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from farmkeys.config import Config

if TYPE_CHECKING:
    from farmkeys.store import Store


def node_store(config: Config) -> Store:
    """This node's store, as ``[node]`` describes it (the store package loaded on use)."""
    from farmkeys.store import Store

    return Store(config.store, node_id=config.node.id, group=config.node.store_group)
