"""The farm, its certificates, the farm state record and the relying parties' fetches.

Every statement on the ``farm``, ``certificate``, ``farm_state`` and
``relying_party_fetch`` tables: the reads of :class:`CertificateQueries` (on the shared
connection) and the writes of :class:`CertificateWrites` (inside a transaction, most of
them the leader's fenced one).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Collection, Sequence
from datetime import datetime
from typing import Any

from farmkeys.db.connection import REQUEST_CHANNEL, Statements
from farmkeys.db.migrations import MigrationQueries
from farmkeys.db.rows import (
    CERTIFICATE_FIELDS,
    CertificateRow,
    Claim,
    Farm,
    FetchRow,
    LiveSet,
    NewCertificate,
    StoredState,
    certificate_row,
    farm_row,
    installed_doc,
    stored_state_row,
)

_FARM = (
    "SELECT name, dkm_group, dkm_container,"
    " (SELECT max(version) FROM farmkeys_migration) AS schema_version FROM farm"
)

_FETCHES = (
    "SELECT relying_party, thumbprint, first_fetched_at, last_fetched_at, node, document,"
    " mac, mac_key"
    " FROM relying_party_fetch ORDER BY relying_party, thumbprint"
)

_STORED_STATE = (
    "SELECT body AS state_body, mac AS state_mac, version AS state_version FROM farm_state"
)

_NOW = "SELECT now() AS now"

# The sync's one statement (ConfigDB.live_set). `claim` records the sync only when the node's
# store, its row and the live set all agree (jsonb arrays compared both ways as sets).
# The names interpolated are the dataclass's fields, never input.
_LIVE_SET = (
    "WITH live AS (SELECT coalesce(jsonb_agg(jsonb_build_object('purpose', purpose,"  # noqa: S608
    " 'role', role, 'thumbprint', thumbprint)), '[]') AS doc,"
    " coalesce(array_agg(DISTINCT master_key), '{}') AS keys"
    " FROM certificate WHERE role <> 'archived'),"
    " claim AS (UPDATE node SET last_sync = now(), last_seen = now(), last_error = NULL"
    " FROM live WHERE %(claimed)s AND node.id = %(node)s AND node.generation = %(gen)s"
    " AND node.installed @> %(doc)s::jsonb AND node.installed <@ %(doc)s::jsonb"
    " AND live.doc @> %(doc)s::jsonb AND live.doc <@ %(doc)s::jsonb"
    " AND node.master_keys @> live.keys"
    " AND node.state_version IS NOT DISTINCT FROM %(sv)s::bigint"
    " AND %(sv)s::bigint IS NOT DISTINCT FROM (SELECT version FROM farm_state)"
    " RETURNING 1)"
    " SELECT f.name, f.dkm_group, f.dkm_container,"
    " (SELECT max(version) FROM farmkeys_migration) AS schema_version,"
    " n.master_keys AS confirmed_keys, n.generation AS node_generation,"
    " n.revoked AS node_revoked,"
    " s.body AS state_body, s.mac AS state_mac,"
    " s.version AS state_version, (SELECT count(*) FROM claim) > 0 AS recorded, "
    + ", ".join(f"c.{name}" for name in CERTIFICATE_FIELDS if name != "blob")
    + ", CASE WHEN c.thumbprint = ANY(%(have)s::text[])"
    " AND c.master_key = ANY(coalesce(n.master_keys, '{}')) THEN NULL ELSE c.blob END AS blob"
    " FROM farm f LEFT JOIN farm_state s ON true LEFT JOIN node n ON n.id = %(node)s"
    " LEFT JOIN certificate c ON c.role <> 'archived'"
    " ORDER BY c.purpose, c.role, c.not_after"
)


def _import_conflict(
    run: Callable[[str, tuple[object, ...]], list[dict[str, Any]]],
    *,
    thumbprint: str,
    purpose: str,
    role: str,
    certificate_id: uuid.UUID | None,
) -> str | None:
    """Why the farm has no room for an imported certificate, or None: it (or its row id)
    is already in the farm, or it would be a second secondary of its purpose."""
    known = run(
        "SELECT role FROM certificate WHERE thumbprint = %s OR id = %s",
        (thumbprint, certificate_id),
    )
    if known:
        return f"certificate {thumbprint} is already in the farm ({known[0]['role']})"
    if role == "secondary":
        secondary = run(
            "SELECT thumbprint FROM certificate WHERE purpose = %s AND role = 'secondary'",
            (purpose,),
        )
        if secondary:
            return (
                f"the farm already has a secondary {purpose} certificate"
                f" {secondary[0]['thumbprint']}"
            )
    return None


class CertificateQueries(MigrationQueries):
    """Reads of the farm and its certificates, and the relying parties' fetches."""

    def now(self) -> datetime:
        """The config DB's clock: every time the farm judges by is the database's."""
        now: datetime = self.fetch(_NOW)[0]["now"]
        return now

    def farm(self) -> Farm | None:
        rows = self.fetch(_FARM)
        return farm_row(rows[0]) if rows else None

    def require_farm(self) -> Farm:
        """The farm, at the schema this farmkeys needs; raises when there is none."""
        farm = self.farm()
        if farm is None:
            raise self._no_farm()
        self.require_current_schema(farm)
        return farm

    def live_set(
        self, node_id: str, *, claim: Claim | None = None, have: Collection[str] = ()
    ) -> LiveSet:
        """The farm, its live (not archived) certificates, the farm state record and the
        master keys ``node_id`` last confirmed, in one statement.

        ``have``: thumbprints the node's store holds intact; their blobs are withheld
        unless sealed under a master key the node has not confirmed. ``claim``: what the
        store holds; when the live set, the farm state version and the node's own row all
        still say exactly that, the same statement records the sync (``recorded``), so a
        sync that finds nothing changed costs one round trip."""
        doc = None if claim is None else installed_doc(claim.installed)
        rows = self.fetch(
            _LIVE_SET,
            {
                "node": node_id,
                "claimed": claim is not None,
                "gen": None if claim is None else claim.generation,
                "doc": doc,
                "sv": None if claim is None else claim.state_version,
                "have": sorted(have),
            },
        )
        if not rows:
            raise self._no_farm()
        live = [r for r in rows if r["id"] is not None]
        return LiveSet(
            farm=farm_row(rows[0]),
            rows=[certificate_row(r) for r in live],
            confirmed_keys=frozenset(rows[0]["confirmed_keys"] or ()),
            state=stored_state_row(rows[0]),
            recorded=bool(rows[0]["recorded"]),
            node_generation=rows[0]["node_generation"],
            node_revoked=frozenset(rows[0]["node_revoked"] or ()),
        )

    def stored_state(self) -> StoredState | None:
        """The farm state record, or None when the config DB has none."""
        rows = self.fetch(_STORED_STATE)
        return stored_state_row(rows[0]) if rows else None

    def certificates(self, *, include_archived: bool = True) -> list[CertificateRow]:
        rows = self.fetch(
            "SELECT * FROM certificate WHERE %s OR role <> 'archived'"
            " ORDER BY purpose, not_after, id",
            (include_archived,),
        )
        return [certificate_row(r) for r in rows]

    def keys_named_by_live(self) -> tuple[set[uuid.UUID], datetime]:
        """The master keys the live blobs are sealed under, and the database's clock."""
        rows = self.fetch(
            "SELECT now() AS now, array(SELECT DISTINCT master_key FROM certificate"
            " WHERE role <> 'archived') AS named"
        )
        return set(rows[0]["named"]), rows[0]["now"]

    def record_fetch(
        self,
        relying_party: str,
        *,
        node_id: str,
        document: str,
        thumbprints: Sequence[str],
        macs: Sequence[bytes | None] | None = None,
        mac_key: uuid.UUID | None = None,
    ) -> None:
        """``relying_party`` fetched ``document`` (metadata or jwks) from ``node_id``, which
        served it these signing thumbprints; ``macs``: each one's fetch MAC under master
        key ``mac_key`` (:mod:`farmkeys.fetch_record`). A thumbprint it had never fetched
        wakes the leader (a promotion may have waited for it: ``policy.require_fetch``)."""
        marks = list(macs) if macs is not None else [None] * len(thumbprints)
        self.fetch(
            "WITH upserted AS ("
            " INSERT INTO relying_party_fetch (relying_party, thumbprint, node, document, mac,"
            " mac_key)"
            " SELECT %(rp)s, t, %(node)s, %(doc)s, m, %(key)s::uuid"
            " FROM unnest(%(thumbprints)s::text[], %(macs)s::bytea[]) AS u(t, m)"
            " ON CONFLICT (relying_party, thumbprint) DO UPDATE SET last_fetched_at = now(),"
            " node = EXCLUDED.node, document = EXCLUDED.document,"
            " mac = coalesce(EXCLUDED.mac, relying_party_fetch.mac),"
            " mac_key = CASE WHEN EXCLUDED.mac IS NULL THEN relying_party_fetch.mac_key"
            " ELSE EXCLUDED.mac_key END"
            " RETURNING (xmax = 0) AS inserted)"
            " SELECT pg_notify(%(channel)s, 'fetch') FROM upserted WHERE inserted LIMIT 1",
            {
                "channel": REQUEST_CHANNEL,
                "rp": relying_party,
                "node": node_id,
                "doc": document,
                "thumbprints": list(thumbprints),
                "macs": marks,
                "key": mac_key,
            },
        )

    def import_conflict(
        self,
        *,
        thumbprint: str,
        purpose: str,
        role: str,
        certificate_id: uuid.UUID | None = None,
    ) -> str | None:
        """Why the farm has no room for an imported certificate, or None (read before
        `import adfs` files its request; the leader checks again when it answers)."""
        return _import_conflict(
            self.fetch,
            thumbprint=thumbprint,
            purpose=purpose,
            role=role,
            certificate_id=certificate_id,
        )

    def fetches(self) -> list[FetchRow]:
        """Every recorded relying-party fetch, by relying party and thumbprint."""
        return [FetchRow(**r) for r in self.fetch(_FETCHES)]


class CertificateWrites(Statements):
    """The farm's certificates and its farm state record, inside one transaction."""

    def create_farm(self, *, name: str, dkm_group: uuid.UUID, dkm_container: str) -> None:
        self.execute(
            "INSERT INTO farm (name, dkm_group, dkm_container) VALUES (%s, %s, %s)",
            (name, dkm_group, dkm_container),
        )

    def insert_certificate(self, row: NewCertificate) -> None:
        self.execute(
            "INSERT INTO certificate (id, purpose, role, thumbprint, sha256, subject, key_type,"
            " not_before, not_after, der, master_key, blob)"
            " VALUES (%(id)s, %(purpose)s, %(role)s, %(thumbprint)s, %(sha256)s, %(subject)s,"
            " %(key_type)s, %(not_before)s, %(not_after)s, %(der)s, %(master_key)s, %(blob)s)",
            row.__dict__,
        )

    def live_certificates(self) -> list[CertificateRow]:
        """The live rows, locked until the transaction ends."""
        rows = self.execute(
            "SELECT * FROM certificate WHERE role <> 'archived'"
            " ORDER BY purpose, not_after, id FOR UPDATE"
        )
        return [certificate_row(r) for r in rows]

    def set_role(self, certificate_id: uuid.UUID, role: str) -> None:
        self.execute(
            "UPDATE certificate SET role = %s, role_since = now() WHERE id = %s",
            (role, certificate_id),
        )

    def set_blob(self, certificate_id: uuid.UUID, *, master_key: uuid.UUID, blob: bytes) -> None:
        """Replace a certificate's blob by the same PKCS#12 sealed under another master key."""
        self.execute(
            "UPDATE certificate SET blob = %s, master_key = %s WHERE id = %s",
            (blob, master_key, certificate_id),
        )

    def import_conflict(
        self, *, thumbprint: str, purpose: str, role: str, certificate_id: uuid.UUID | None
    ) -> str | None:
        """Why the farm has no room for an imported certificate, or None (in the leader's
        fenced transaction, which inserts it)."""
        return _import_conflict(
            self.execute,
            thumbprint=thumbprint,
            purpose=purpose,
            role=role,
            certificate_id=certificate_id,
        )

    def fetches(self) -> list[FetchRow]:
        """Every recorded relying-party fetch (read inside this transaction)."""
        return [FetchRow(**r) for r in self.execute(_FETCHES)]

    def stored_state(self) -> StoredState | None:
        """The farm state record, locked until the transaction ends."""
        rows = self.execute(_STORED_STATE + " FOR UPDATE")
        return stored_state_row(rows[0]) if rows else None

    def write_state(self, *, body: bytes, mac: bytes, version: int, term: int | None) -> None:
        """Replace the farm state record (the caller made ``body`` and its ``mac``)."""
        self.execute(
            "INSERT INTO farm_state (singleton, version, body, mac, term)"
            " VALUES (true, %(version)s, %(body)s, %(mac)s, %(term)s)"
            " ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version,"
            " body = EXCLUDED.body, mac = EXCLUDED.mac, term = EXCLUDED.term,"
            " written_at = now()",
            {"version": version, "body": body, "mac": mac, "term": term},
        )

    def had_state_record(self) -> bool:
        """Whether this farm ever had a farm state record: a node installed one, or the
        audit log shows one adopted or repaired (so a missing record is not a new farm's)."""
        rows = self.execute(
            "SELECT max(state_version) AS version FROM node"
            " UNION ALL SELECT count(*) FROM audit_event"
            " WHERE action IN ('state_adopt', 'state_repair')"
        )
        return any(r["version"] for r in rows)
