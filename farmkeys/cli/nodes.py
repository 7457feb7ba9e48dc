"""`farmkeys nodes` and `farmkeys nodes remove NODE`: the farm's nodes as the config DB knows
them, and forgetting one that is gone (audited)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from farmkeys.cli.exit_codes import EXIT_OK
from farmkeys.cli.render import node_lines, nodes_json
from farmkeys.config import Config
from farmkeys.errors import NodeInUseError
from farmkeys.terminal import escape
from farmkeys.vocab import AuditAction

if TYPE_CHECKING:
    from farmkeys.db import ConfigDB


def nodes_command(args: argparse.Namespace, config: Config) -> int:
    from farmkeys.db import ConfigDB
    from farmkeys.status.nodes import node_statuses

    with ConfigDB(config.database, config.retry) as db:
        if args.nodes_command == "remove":
            return _remove_node(args, config, db)
        live = frozenset(r.identity for r in db.certificates(include_archived=False))
        nodes, _ = node_statuses(
            db.node_documents(
                live,
                silent_after_seconds=3 * config.lease.ttl_seconds,
                stopped_after_seconds=config.status.stopped_warning_seconds,
            )
        )
    if args.json:
        print(nodes_json(nodes, pretty=sys.stdout.isatty()))
    else:
        for line in node_lines(nodes, wide=True):
            print(line)
    return EXIT_OK


def _remove_node(args: argparse.Namespace, config: Config, db: ConfigDB) -> int:
    """`nodes remove NODE`: its row deleted and the deletion audited, in one transaction."""
    from farmkeys.operator import requester

    node = args.node
    seen = db.node_seen(node)
    if seen is None:
        raise NodeInUseError(
            f"the config DB has no node {node!r}", "`farmkeys nodes` lists the nodes it has"
        )
    age = seen["age_seconds"]
    if age is not None and age < config.lease.ttl_seconds and not args.force:
        raise NodeInUseError(
            f"node {node} was heard from {age:.0f} s ago (within lease.ttl_seconds,"
            f" {config.lease.ttl_seconds:g} s): it still runs, and would come back",
            f"stop farmkeys on {node} first, or give --force; nothing was changed",
        )
    who = requester(args.reason)
    with db.transaction() as tx:
        gone = tx.remove_node(node)
        if gone is None:
            raise NodeInUseError(f"node {node!r} went away meanwhile", "nothing was changed")
        last = gone["last_seen"]
        when = "" if last is None else f" (last seen {last:%Y-%m-%dT%H:%M:%SZ})"
        tx.audit(
            node=config.node.id,
            term=None,
            action=AuditAction.NODE_REMOVE,
            detail=f"removed node {node}{when}",
            by=who,
        )
    print(f"removed node {escape(node)}; its store and services are untouched")
    return EXIT_OK
