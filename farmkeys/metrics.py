"""Prometheus metrics of a serving node, read from the farm's state at scrape time.

Names follow cert-manager's (``..._expiration_timestamp_seconds``). Every farm
gauge comes from the same document ``farmkeys status --json`` prints (read
without the directory, so a scrape makes no LDAP request and opens no key);
``farmkeys_leader`` and the sync counters are this process's own.

======================================================  =====================================
``farmkeys_certificate_expiration_timestamp_seconds``   NotAfter of each live certificate
``farmkeys_certificate_not_before_timestamp_seconds``   NotBefore of each live certificate
``farmkeys_certificate_next_action_timestamp_seconds``  when its next rollover step is due
``farmkeys_node_last_sync_timestamp_seconds``           each node's last successful sync
``farmkeys_node_in_sync``                               1 when a node installed the live set
``farmkeys_leader``                                     1 on the leader's scrape, else 0
``farmkeys_master_key_created_timestamp_seconds``       each master key that is not deleted
``farmkeys_relying_party_last_fetch_timestamp_seconds`` each relying party's last fetch
``farmkeys_relying_party_has_secondary``                1 when it fetched the signing secondary
``farmkeys_health``                                     status: 0 ok, 1 warning, 2 critical
``farmkeys_status_up``                                  1 when the farm's state could be read
``farmkeys_sync_total`` / ``farmkeys_sync_errors_total``  this process's syncs, and failures
======================================================  =====================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from farmkeys.errors import Error

if TYPE_CHECKING:
    from farmkeys.status import (
        CertificateStatus,
        FarmStatus,
        NodeStatus,
        RelyingPartyStatus,
    )

log = logging.getLogger(__name__)

HEALTH_VALUE = {"ok": 0, "warning": 1, "critical": 2}


@dataclass(frozen=True)
class NodeView:
    """This process's own part of a scrape."""

    node: str
    leading: bool
    term: int | None
    syncs: int
    sync_errors: int


class FarmCollector(Collector):
    """Builds every metric when scraped: ``status()`` is the status document (raising when
    the farm cannot be read, which becomes ``farmkeys_status_up 0``)."""

    def __init__(self, status: Callable[[], FarmStatus], view: Callable[[], NodeView]) -> None:
        self._status = status
        self._view = view

    def collect(self) -> Iterator[Metric]:
        view = self._view()
        yield from _own(view)
        try:
            status = self._status()
        except Error as exc:
            log.warning("metrics: cannot read the farm's state: %s", exc.diagnostics())
            yield _gauge("farmkeys_status_up", "1 when the farm's state could be read", [], 0)
            return
        yield _gauge("farmkeys_status_up", "1 when the farm's state could be read", [], 1)
        yield from farm_metrics(status)


def render(collector: Collector) -> bytes:
    """The text exposition of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)


def farm_metrics(status: FarmStatus) -> Iterator[Metric]:
    """The farm's gauges, from a status document."""
    yield from _certificate_metrics(status.certificates)
    yield from _node_metrics(status.nodes)
    keys = GaugeMetricFamily(
        "farmkeys_master_key_created_timestamp_seconds",
        "When a master key was made (Unix time), by state",
        labels=["id", "state"],
    )
    for k in status.master_keys:
        if k.state != "deleted" and k.created_at is not None:
            keys.add_metric([str(k.id), k.state], k.created_at.timestamp())
    yield keys
    yield from _relying_party_metrics(status.relying_parties)
    yield _gauge(
        "farmkeys_health",
        "farmkeys status: 0 ok, 1 warning, 2 critical",
        [],
        HEALTH_VALUE[status.health],
    )


def _certificate_metrics(certificates: Sequence[CertificateStatus]) -> Iterator[Metric]:
    cert_labels = ["purpose", "role", "thumbprint"]
    expiry = GaugeMetricFamily(
        "farmkeys_certificate_expiration_timestamp_seconds",
        "NotAfter of a live certificate (Unix time)",
        labels=cert_labels,
    )
    not_before = GaugeMetricFamily(
        "farmkeys_certificate_not_before_timestamp_seconds",
        "NotBefore of a live certificate (Unix time)",
        labels=cert_labels,
    )
    next_action = GaugeMetricFamily(
        "farmkeys_certificate_next_action_timestamp_seconds",
        "When the next rollover step of a live certificate is due (Unix time; past: overdue)",
        labels=[*cert_labels, "action"],
    )
    for c in certificates:
        if c.role == "archived":
            continue
        labels = [c.purpose, c.role, c.thumbprint]
        expiry.add_metric(labels, c.not_after.timestamp())
        not_before.add_metric(labels, c.not_before.timestamp())
        if c.next_action is not None:
            action = c.next_action
            next_action.add_metric([*labels, action.action], action.at.timestamp())
    yield from (expiry, not_before, next_action)


def _node_metrics(nodes: Sequence[NodeStatus]) -> Iterator[Metric]:
    last_sync = GaugeMetricFamily(
        "farmkeys_node_last_sync_timestamp_seconds",
        "When a node last installed the live set successfully (Unix time)",
        labels=["node"],
    )
    in_sync = GaugeMetricFamily(
        "farmkeys_node_in_sync", "1 when a node has installed the live set", labels=["node"]
    )
    for n in nodes:
        if n.last_sync is not None:
            last_sync.add_metric([n.id], _ts(n.last_sync))
        in_sync.add_metric([n.id], 1 if n.in_sync else 0)
    yield from (last_sync, in_sync)


def _relying_party_metrics(parties: Sequence[RelyingPartyStatus]) -> Iterator[Metric]:
    fetches = GaugeMetricFamily(
        "farmkeys_relying_party_last_fetch_timestamp_seconds",
        "When a relying party last fetched the metadata or the JWKS (Unix time)",
        labels=["rp"],
    )
    has_secondary = GaugeMetricFamily(
        "farmkeys_relying_party_has_secondary",
        "1 when a relying party has fetched the signing secondary (absent: no secondary)",
        labels=["rp"],
    )
    for rp in parties:
        if rp.last_fetch_at is not None:
            fetches.add_metric([rp.name], rp.last_fetch_at.timestamp())
        if rp.has_secondary is not None:
            has_secondary.add_metric([rp.name], 1 if rp.has_secondary else 0)
    yield from (fetches, has_secondary)


def _own(view: NodeView) -> Iterator[Metric]:
    leader = GaugeMetricFamily(
        "farmkeys_leader", "1 when this node holds the leader lease", labels=["node", "term"]
    )
    term = "" if view.term is None else str(view.term)
    leader.add_metric([view.node, term], 1 if view.leading else 0)
    yield leader
    yield CounterMetricFamily(
        "farmkeys_sync", "Syncs this serve process ran", value=view.syncs, labels=None
    )
    yield CounterMetricFamily(
        "farmkeys_sync_errors", "Syncs of this serve process that failed", value=view.sync_errors
    )


def _gauge(name: str, documentation: str, labels: list[str], value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=labels)
    gauge.add_metric([], value)
    return gauge


def _ts(iso: str) -> float:
    """A time the config DB wrote as ISO 8601 text (a node's), as Unix time."""
    return datetime.fromisoformat(iso).timestamp()
