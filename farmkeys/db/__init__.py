"""The config DB: one shared PostgreSQL database, reached with psycopg 3, and the only
place in farmkeys that holds SQL.

It holds the farm (its name and DKM group), the certificate rows (public certificate,
role, dates, and the private key only as a sealed blob), the authenticated farm state
record, the master keys' journal, the request queue, what each node last installed, the
leader lease and the audit log. One module per table, each with its reads (on the shared
connection) and its writes (inside a transaction); :class:`ConfigDB` and
:class:`Transaction` compose them, so a caller asks by intent (``db.nodes()``,
``fence.tx.make_current(key)``) and never writes a statement.

Everything in it is attacker-writable (docs/security.md): a row says what it holds,
never that it is true.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from farmkeys.db.audit import AuditQueries, AuditWrites, attributed_to
from farmkeys.db.certificates import CertificateQueries, CertificateWrites
from farmkeys.db.connection import CHANGED_CHANNEL, REQUEST_CHANNEL, describe_dsn
from farmkeys.db.lease import LeaseQueries, LeaseWrites
from farmkeys.db.master_keys import MasterKeyQueries, MasterKeyWrites
from farmkeys.db.migrations import MIGRATION_TABLE, Migration, migrations
from farmkeys.db.nodes import NodeQueries, NodeWrites
from farmkeys.db.preflight import PreflightQueries
from farmkeys.db.requests import RequestQueries, RequestWrites
from farmkeys.db.rows import (
    Attribution,
    CertificateRow,
    Claim,
    Farm,
    FenceCheck,
    FetchRow,
    KeyUse,
    Lease,
    LiveSet,
    MasterKeyRow,
    NewCertificate,
    NodeRow,
    RequestAnswer,
    RequestRow,
    StoredState,
)

__all__ = [
    "CHANGED_CHANNEL",
    "MIGRATION_TABLE",
    "REQUEST_CHANNEL",
    "Attribution",
    "CertificateRow",
    "Claim",
    "ConfigDB",
    "Farm",
    "FenceCheck",
    "FetchRow",
    "KeyUse",
    "Lease",
    "LiveSet",
    "MasterKeyRow",
    "Migration",
    "NewCertificate",
    "NodeRow",
    "RequestAnswer",
    "RequestRow",
    "StoredState",
    "Transaction",
    "attributed_to",
    "describe_dsn",
    "migrations",
]


class Transaction(
    CertificateWrites, MasterKeyWrites, RequestWrites, AuditWrites, LeaseWrites, NodeWrites
):
    """The statements of one open transaction of a :class:`ConfigDB`."""


class ConfigDB(
    CertificateQueries,
    MasterKeyQueries,
    NodeQueries,
    RequestQueries,
    AuditQueries,
    LeaseQueries,
    PreflightQueries,
):
    """A connection to the config DB (:class:`farmkeys.db.connection.Connection`) with the
    reads and writes of every table."""

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """One transaction: everything in it commits together or not at all. The
        connection is this thread's until it ends."""
        with self._transaction(Transaction) as tx:
            yield tx
