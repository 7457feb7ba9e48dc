"""The leader's writes: applying rollover decisions and answering rollover requests.

Also the one writer of sealed certificates (:func:`new_certificate`), which
`init` uses too, and the operator's side of a request (:func:`request_rollover`).

What to do is decided by :mod:`farmkeys.policy`, a pure function; this
module only carries it out, inside :meth:`farmkeys.election.Election.fenced`
transactions, so every step is done once, by the one process that holds the
lease, and is recorded in the audit log with its term. Each transaction ends
by NOTIFYing the nodes, which re-sync within a second.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from farmkeys import policy
from farmkeys.config import Config, RetryConfig
from farmkeys.configdb import (
    CHANGED_CHANNEL,
    CertificateRow,
    ConfigDB,
    Farm,
    FetchRow,
    NewCertificate,
    Transaction,
)
from farmkeys.directory import Directory
from farmkeys.election import Election, Fence, read_lease
from farmkeys.errors import (
    CertificateError,
    DirectoryError,
    Error,
    FarmStateError,
    InvalidBlobError,
    LeaderTimeoutError,
    MasterKeyMissingError,
    RequestRefusedError,
)
from farmkeys.formats import blob as blob_format
from farmkeys.formats import bundle, certificates, farm_state, fetch_record
from farmkeys.formats import request as request_format
from farmkeys.sync import blob_context
from farmkeys.vocab import PURPOSES

log = logging.getLogger(__name__)

# decide() converges in a few rounds (archive, then promote, then generate);
# a bound keeps a bug from looping inside one check.
MAX_ROUNDS = 6
# The master-key check's own directory connection: one attempt, no retries, so an
# outage skips the check at once and a write under the lease row is bounded.
_ONE_ATTEMPT = RetryConfig(total_seconds=0.0)

# A key made before a fenced transaction is used only this soon after: its certificate's
# validity starts from when it was made.
SPARE_FRESHNESS = timedelta(minutes=10)

CLOCK_SKEW_ALLOWANCE = timedelta(hours=1)
"""A new certificate is valid from this long before it is made, so a relying party whose
clock runs slow accepts it as soon as it is promoted. Its end is ``certificate_duration``
after it is made, so the rollover schedule is unchanged."""


@dataclass(frozen=True)
class Applied:
    """One step the leader carried out."""

    action: str
    purpose: str
    thumbprint: str
    detail: str

    def __str__(self) -> str:
        return f"{self.action} {self.purpose} {self.thumbprint}: {self.detail}"


def generate_certificate(config: Config, *, purpose: str, now: datetime) -> certificates.Generated:
    """A new key and certificate for ``purpose``, valid from ``now`` less the clock-skew
    allowance for the policy's certificate duration. The costly part of a rollover: the
    leader does it before it opens a fenced transaction."""
    start = now.replace(microsecond=0)
    return certificates.generate(
        farm_name=config.farm.name,
        purpose=purpose,
        key_type=config.policy.key_for(purpose),
        not_before=start - CLOCK_SKEW_ALLOWANCE,
        not_after=start + config.policy.units(config.policy.certificate_duration),
    )


def new_certificate(
    config: Config,
    *,
    dkm_group: uuid.UUID,
    purpose: str,
    role: str,
    master_key_id: uuid.UUID,
    master_key: bytes,
    now: datetime,
) -> NewCertificate:
    """Generate a key and certificate for ``purpose`` and seal it, ready for its row."""
    generated = generate_certificate(config, purpose=purpose, now=now)
    return sealed_certificate(
        config,
        dkm_group=dkm_group,
        certificate_id=uuid.uuid4(),
        purpose=purpose,
        role=role,
        generated=generated,
        master_key_id=master_key_id,
        master_key=master_key,
    )


def sealed_certificate(
    config: Config,
    *,
    dkm_group: uuid.UUID,
    certificate_id: uuid.UUID,
    purpose: str,
    role: str,
    generated: certificates.Generated,
    master_key_id: uuid.UUID,
    master_key: bytes,
) -> NewCertificate:
    """A certificate and its key sealed under a master key, as its row will hold them."""
    cert = generated.certificate
    thumb = certificates.thumbprint(cert)
    # The exact bytes each node writes (farmkeys.bundle): a node checks them cheaply and
    # never parses a PKCS#12 or re-encodes the key.
    packed = bundle.pack(generated, friendly_name=f"{config.farm.name} token {purpose} {thumb}")
    blob = blob_format.seal(
        packed,
        master_key=master_key,
        master_key_id=master_key_id,
        context=blob_context(dkm_group, certificate_id, purpose),
    )
    return NewCertificate(
        id=certificate_id,
        purpose=purpose,
        role=role,
        thumbprint=thumb,
        sha256=certificates.sha256_fingerprint(cert),
        subject=cert.subject.rfc4514_string(),
        key_type=certificates.key_type_of(generated.key),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        der=certificates.certificate_der(cert),
        master_key=master_key_id,
        blob=blob,
    )


def write_first_state(
    tx: Transaction,
    *,
    dkm_group: uuid.UUID,
    rows: Sequence[farm_state.LiveRow],
    master_key_id: uuid.UUID,
    master_key: bytes,
) -> farm_state.FarmState:
    """A new farm's state record, version 1, written in the transaction that creates it."""
    state = farm_state.FarmState.build(
        farm=dkm_group, version=1, term=None, master_key=master_key_id, rows=rows
    )
    body, mac = farm_state.seal(state, master_key)
    tx.write_state(body=body, mac=mac, version=state.version, term=None)
    return state


class _NeedKey(Exception):
    """A fenced step found it must generate a certificate it has no key made for: the
    transaction is given up, the key made outside it, and the step tried again."""

    def __init__(self, purpose: str) -> None:
        super().__init__(purpose)
        self.purpose = purpose


class Leader:
    """The writes a lease holder makes, each in a fenced transaction.

    Every fenced transaction first checks the farm state record against the
    certificate rows (:meth:`_fenced`): a leader never builds on rows that a
    config-DB writer changed behind its back. Before it commits, it writes the
    new record when the live set changed.
    """

    def __init__(
        self,
        config: Config,
        db: ConfigDB,
        directory: Directory,
        election: Election,
        *,
        on_step: Callable[[str, uuid.UUID], None] | None = None,
    ) -> None:
        """``on_step(step, key_id)`` is called after each committed step of a master-key
        roll (``recorded``, ``added``, ``resealed``, ``current``, ``deleted``)."""
        self._on_step = on_step
        self._config = config
        self._db = db
        self._directory = directory
        self._election = election
        self._key: tuple[uuid.UUID, bytes] | None = None  # the current master key, in memory
        self._key_error: DirectoryError | None = None
        # Keys and certificates made before a fenced transaction opened, by purpose, with the
        # database's clock when they were made: generating is slow, the lease row is not
        # locked meanwhile.
        self._spares: dict[str, tuple[certificates.Generated, datetime]] = {}
        self._revoking: set[str] = set()  # urgently replaced in the open fenced transaction
        self._shredding: set[uuid.UUID] = set()  # master keys deleted in it
        self._answering: list[farm_state.Answered] = []  # requests answered in it
        self._replacing: list[farm_state.Replaced] = []  # master keys replaced in it
        self._before: farm_state.FarmState | None = None  # its authentic record
        self._farm: Farm | None = None  # the farm, as last read

    def _refresh_key(self, farm: Farm) -> None:
        """Learn the current master key before any transaction opens.

        Which key is current is the config DB's record (``master_key``), the
        journal the leader writes; its bytes come from the directory once per
        process and stay in memory. A farm made before master keys were
        recorded has its keys adopted from the directory first.

        Directory I/O never happens while the lease row is locked, except the
        master-key writes themselves (:meth:`roll_master_key`). If the
        directory cannot be read, the last key read stays in use (it is still
        valid; a new blob sealed under it opens as well as any other).
        """
        try:
            current = policy.current_key(self._db.master_keys())
            key_id = current.id if current is not None else self._adopt(farm)
            key_id = self._record_key(key_id)
            if self._key is None or self._key[0] != key_id:
                self._key = (key_id, self._directory.master_key(farm.dkm_group, key_id))
            self._key_error = None
        except DirectoryError as exc:
            if self._key is None:
                self._key_error = exc
            elif self._key_error is None:  # once per outage
                log.warning(
                    "directory unavailable; sealing under the last master key read: %s", exc.what
                )
                self._key_error = exc

    def _record_key(self, table_current: uuid.UUID) -> uuid.UUID:
        """The current master key: the one the farm state record is under, which the leader
        chose when it last wrote it (the fence verifies the record before anything is built
        on it); the ``master_key`` table's ``current`` only for a farm without a record.
        A table that names another key is a DB writer's edit, and is not followed."""
        stored = self._db.stored_state()
        if stored is None:
            return table_current
        try:
            named = farm_state.parse(stored.body).master_key
        except FarmStateError:
            return table_current  # the fenced check refuses it
        if named != table_current:
            log.warning(
                "the master_key table names %s current, but the farm state record is under %s:"
                " sealing under %s",
                table_current,
                named,
                named,
            )
        return named

    def _current_key(self) -> tuple[uuid.UUID, bytes]:
        """The current master key in memory, or the error that kept it from being read."""
        if self._key is None:
            raise self._key_error or DirectoryError(
                "the current master key has not been read", "check the directory"
            )
        return self._key

    def tick(self) -> list[Applied]:
        """What `serve` runs on schedule: answer pending requests, then the certificate and
        master-key rollover checks, with one look at the master key for all."""
        farm = self._farm_and_key()
        self.answer_requests(farm=farm)
        done = self.check(farm=farm)
        return done + self.check_master_keys(farm=farm)

    def _farm_and_key(self) -> Farm:
        """The farm, with the current master key, and the one the farm state record names,
        read (outside any transaction)."""
        farm = self._db.require_farm()
        self._farm = farm
        self._refresh_key(farm)
        try:
            stored = self._db.stored_state()
            if stored is not None:
                named = farm_state.parse(stored.body).master_key
                if self._key is None or self._key[0] != named:
                    self._directory.master_key(farm.dkm_group, named)  # cached for _fenced
        except (FarmStateError, DirectoryError):
            pass  # the fenced check reports it
        return farm

    # -- the fence and the farm state ----------------------------------------------------

    @contextmanager
    def _fenced(self, farm: Farm, *, key: tuple[uuid.UUID, bytes] | None = None) -> Iterator[Fence]:
        """A fenced transaction that starts by checking the farm state record and ends by
        writing the next one, under ``key`` (default: the current master key), when the
        live set changed or the record is under another key.

        Raises :class:`FarmStateError` and writes nothing when the config DB's rows do not
        match an authentic record (see `farmkeys repair-state`).
        """
        with self._election.fenced(self._db) as fence:
            self._revoking, self._shredding, self._answering = set(), set(), []
            self._replacing = []
            before = self._authentic_state(fence, farm)
            self._before = before
            yield fence
            self._write_state(fence, farm, before, key=key)

    def _authentic_state(self, fence: Fence, farm: Farm) -> farm_state.FarmState | None:
        """The config DB's farm state, verified and matching the live rows; None for a farm
        from before farm states, whose first record the next write makes."""
        stored = fence.tx.stored_state()
        if stored is None:
            installed = fence.tx.execute(
                "SELECT max(state_version) AS version FROM node"
                " UNION ALL SELECT count(*) FROM audit_event"
                " WHERE action IN ('state_adopt', 'state_repair')"
            )
            if not any(r["version"] for r in installed):
                return None
            raise FarmStateError(
                "the config DB has no farm state record, but this farm has had one",
                farm_state.REPAIR,
            )
        state = farm_state.verify(
            stored.body,
            stored.mac,
            farm=farm.dkm_group,
            key_for=lambda key_id: self._key_bytes(farm, key_id),
        )
        error = farm_state.mismatch(state, fence.tx.live_certificates())
        if error is not None:
            raise error
        return state

    def _key_bytes(self, farm: Farm, key_id: uuid.UUID) -> bytes:
        """A master key's bytes: the current one from memory, another from the directory
        (which caches what it read)."""
        if self._key is not None and self._key[0] == key_id:
            return self._key[1]
        return self._directory.master_key(farm.dkm_group, key_id)

    def _write_state(
        self,
        fence: Fence,
        farm: Farm,
        before: farm_state.FarmState | None,
        *,
        key: tuple[uuid.UUID, bytes] | None,
        revoked: set[str] | None = None,
        shredded: set[uuid.UUID] | None = None,
        version: int | None = None,
        action: str | None = None,
    ) -> farm_state.FarmState | None:
        """Write the next farm state record if it differs from ``before``; the one written.

        ``revoked`` and ``shredded``: the whole lists (repair-state), else ``before``'s and
        what this transaction replaced urgently or deleted. ``version``: the version to
        write (repair-state), else one above ``before``'s. ``action``: the audit action to
        record the write under (a farm's first record is ``state_adopt``).
        """
        rows = fence.tx.live_certificates()
        if revoked is None:
            revoked = set(before.revoked if before is not None else ()) | self._revoking
        if shredded is None:
            shredded = self._shredding | (
                set(before.shredded)
                if before is not None and before.format != farm_state.FORMAT_1
                else self._tombstones(fence)
            )
        replaced = self._replacing + (
            list(before.replaced)
            if before is not None and before.format != farm_state.FORMAT_1
            else self._replaced_since_now(fence)
        )
        known = key if key is not None else self._key  # None: not read (the directory is down)
        kept = () if before is None else before.answered
        if before is not None and action is None and not self._answering:
            unchanged = farm_state.FarmState.build(
                farm=farm.dkm_group,
                version=before.version,
                term=before.term,
                master_key=before.master_key,
                rows=rows,
                revoked=revoked,
                shredded=shredded,
                answered=kept,
                replaced=replaced,
            )
            if before.same_content(unchanged) and (known is None or known[0] == before.master_key):
                return None  # nothing to write: no key needed
        key_id, key_bytes = known if known is not None else self._current_key()
        now = int(fence.now.timestamp())
        state = farm_state.FarmState.build(
            farm=farm.dkm_group,
            version=self._next_version(before) if version is None else version,
            term=fence.term,
            master_key=key_id,
            rows=rows,
            revoked=revoked,
            shredded=shredded,
            # Expired requests are refused as stale anyway: a record keeps only the others.
            answered=[a for a in kept if a.expires >= now] + self._answering,
            replaced=replaced,
        )
        body, mac = farm_state.seal(state, key_bytes)
        fence.tx.write_state(body=body, mac=mac, version=state.version, term=fence.term)
        if before is None and action is None:
            action = "state_adopt"
        if action is not None:
            fence.tx.audit(
                node=self._election.node_id,
                term=fence.term,
                action=action,
                master_key=key_id,
                detail=f"farm state version {state.version}: {len(state.live)} live certificates",
            )
        return state

    def _replaced_since_now(self, fence: Fence) -> list[farm_state.Replaced]:
        """The replaced master keys to record when no record lists them yet (a farm's first
        record of format 2): those the ``master_key`` table marks ``previous``, replaced as
        of now. Later than the truth, so their deletion can only come later, never sooner."""
        rows = fence.tx.execute("SELECT id FROM master_key WHERE state = 'previous'")
        now = int(fence.now.timestamp())
        return [farm_state.Replaced(r["id"], now, False) for r in rows]

    def _tombstones(self, fence: Fence) -> set[uuid.UUID]:
        """The master keys to record as shredded when no record lists them yet (a farm's
        first record of format 2): those the ``master_key`` table marks deleted. The table
        is a DB writer's to edit, so never the current key nor one a live blob names: a
        tombstone only keeps `escrow import` from restoring a key, so one too many can at
        worst refuse the restore of a key the farm no longer uses."""
        rows = fence.tx.execute(
            "SELECT id FROM master_key WHERE state = 'deleted' AND NOT EXISTS (SELECT 1 FROM"
            " certificate c WHERE c.master_key = master_key.id AND c.role <> 'archived')"
        )
        current = None if self._key is None else self._key[0]
        return {r["id"] for r in rows} - {current}

    @staticmethod
    def _next_version(before: farm_state.FarmState | None) -> int:
        """One above the last authentic record's version (1 for a farm's first record).

        Never the ``farm_state.version`` column nor a node's reported version: both are a
        DB writer's to set, and a version pushed to the bigint's end would freeze the farm
        (`status` flags either when it disagrees with the record)."""
        version = 1 if before is None else before.version + 1
        if version > farm_state.MAX_VERSION:
            raise FarmStateError(
                f"the farm state version cannot rise above {before.version if before else 0}",
                farm_state.REPAIR,
            )
        return version

    def _take_spare(self, purpose: str, now: datetime) -> certificates.Generated:
        """The key made for ``purpose`` before this transaction; :class:`_NeedKey` when
        none was (or it is stale), so the caller makes one outside and tries again."""
        spare = self._spares.pop(purpose, None)
        if spare is None or not timedelta(0) <= now - spare[1] <= SPARE_FRESHNESS:
            raise _NeedKey(purpose)
        return spare[0]

    def _make_spare(self, purpose: str) -> None:
        """Generate a key and certificate for ``purpose``, with no transaction open."""
        now = self._db.fetch("SELECT now() AS now")[0]["now"]
        self._spares[purpose] = (
            generate_certificate(self._config, purpose=purpose, now=now),
            now,
        )

    def _make_spares(self, actions: Sequence[policy.Action]) -> None:
        """Make the keys ``actions`` will need, before the fenced transaction opens."""
        for action in actions:
            needs_key = action.kind in ("generate", "generate_and_promote")
            if needs_key and action.purpose not in self._spares:
                self._make_spare(action.purpose)

    def check(self, *, farm: Farm | None = None) -> list[Applied]:
        """Run the rollover check: apply what the policy says is due, until nothing is.

        ``farm``: given by :meth:`tick`, which has just read the master key.
        """
        if farm is None:
            farm = self._farm_and_key()
        done: list[Applied] = []
        for _ in range(MAX_ROUNDS):
            # What is likely due, decided outside the fence, so its keys are made before.
            live = self._live()
            unfetched = self._unfetched(self._db.fetches, live)
            self._make_spares(
                policy.decide(self._config.policy, self._db_now(), live, unfetched=unfetched)
            )
            try:
                with self._fenced(farm) as fence:
                    rows = fence.tx.live_certificates()
                    unfetched = self._unfetched(fence.tx.fetches, rows)
                    actions = policy.decide(
                        self._config.policy, fence.now, rows, unfetched=unfetched
                    )
                    if not actions:
                        break
                    steps = [self._apply(fence, farm, rows, action) for action in actions]
                    fence.tx.notify(CHANGED_CHANNEL, f"term {fence.term}")
            except _NeedKey as need:
                self._make_spare(need.purpose)
                continue
            except DirectoryError as exc:
                # The farm state's key could not be read to verify it: no write is built on
                # rows unverified. The next check tries again.
                log.warning(
                    "rollover check skipped, the farm state cannot be verified: %s", exc.what
                )
                break
            done.extend(steps)
        self._spares.clear()
        for step in done:
            log.info("rollover: %s", step)
        return done

    def _unfetched(
        self, fetches: Callable[[], Sequence[FetchRow]], rows: Sequence[CertificateRow]
    ) -> dict[uuid.UUID, tuple[str, ...]]:
        """With policy.require_fetch: the relying parties that have not fetched each signing
        secondary (read only then, and only when there is a secondary)."""
        parties = [p.name for p in self._config.publish.parties]
        has_secondary = any(r.purpose == "signing" and r.role == "secondary" for r in rows)
        if not (self._config.policy.require_fetch and parties and has_secondary):
            return {}
        fetched = {(f.relying_party, f.thumbprint) for f in fetches() if self._authentic(f)}
        return policy.unfetched_by(parties, fetched, rows)

    def _authentic(self, fetch: FetchRow) -> bool:
        """Whether a fetch record carries a valid MAC of the node that served it: a forged
        row must not release a promotion held for that relying party. The key is one the
        leader has read (cached by the directory client), so this costs no request."""
        if fetch.mac is None or fetch.mac_key is None or self._farm is None:
            return False
        farm = self._farm
        try:
            key = fetch_record.mac_key(self._key_bytes(farm, fetch.mac_key), farm.dkm_group)
        except DirectoryError:
            return False
        return fetch_record.verify(
            key,
            fetch.mac,
            farm=farm.dkm_group,
            relying_party=fetch.relying_party,
            thumbprint=fetch.thumbprint,
        )

    def _db_now(self) -> datetime:
        now: datetime = self._db.fetch("SELECT now() AS now")[0]["now"]
        return now

    def _live(self) -> list[CertificateRow]:
        return self._db.certificates(include_archived=False)

    def _apply(
        self, fence: Fence, farm: Farm, rows: Sequence[CertificateRow], action: policy.Action
    ) -> Applied:
        by_id = {r.id: r for r in rows}
        if action.kind == "archive":
            assert action.certificate_id is not None
            row = by_id[action.certificate_id]
            fence.tx.set_role(row.id, "archived")
            return self._audit(fence, "archive", row.purpose, row.id, row.thumbprint, action.reason)
        if action.kind == "promote":
            assert action.certificate_id is not None
            self._retire_primary(fence, rows, action.purpose, reason=action.reason)
            row = by_id[action.certificate_id]
            fence.tx.set_role(row.id, "primary")
            return self._audit(fence, "promote", row.purpose, row.id, row.thumbprint, action.reason)
        if action.kind == "generate":
            return self._generate(fence, farm, action.purpose, "secondary", action.reason)
        if action.kind == "generate_and_promote":
            self._retire_primary(fence, rows, action.purpose, reason=action.reason)
            return self._generate(fence, farm, action.purpose, "primary", action.reason)
        raise AssertionError(f"unknown action {action.kind}")

    def _retire_primary(
        self, fence: Fence, rows: Sequence[CertificateRow], purpose: str, *, reason: str
    ) -> None:
        """The primary of ``purpose`` becomes retired: still installed and published."""
        for row in rows:
            if row.purpose == purpose and row.role == "primary":
                fence.tx.set_role(row.id, "retired")
                self._audit(fence, "retire", purpose, row.id, row.thumbprint, f"replaced: {reason}")

    def _generate(self, fence: Fence, farm: Farm, purpose: str, role: str, reason: str) -> Applied:
        key_id, key = self._current_key()  # raising rolls the transaction back
        row = sealed_certificate(
            self._config,
            dkm_group=farm.dkm_group,
            certificate_id=uuid.uuid4(),
            purpose=purpose,
            role=role,
            generated=self._take_spare(purpose, fence.now),
            master_key_id=key_id,
            master_key=key,
        )
        fence.tx.insert_certificate(row)
        action = "generate" if role == "secondary" else "generate_and_promote"
        return self._audit(fence, action, purpose, row.id, row.thumbprint, reason)

    def _audit(
        self,
        fence: Fence,
        action: str,
        purpose: str,
        certificate: uuid.UUID,
        thumbprint: str,
        detail: str,
    ) -> Applied:
        fence.tx.audit(
            node=self._election.node_id,
            term=fence.term,
            action=action,
            purpose=purpose,
            certificate=certificate,
            thumbprint=thumbprint,
            detail=detail,
        )
        return Applied(action, purpose, thumbprint, detail)

    # -- master keys -------------------------------------------------------------------
    #
    # The config DB's ``master_key`` table is the journal: a new key is recorded
    # (``pending``) before the directory holds it, and every later step is a fenced
    # transaction. The directory writes (add a key, name the current one in
    # CryptoPolicy, delete a key) run inside the fenced transaction whose commit
    # records them, while it holds the lease row, on a one-attempt connection: a
    # leader that lost its lease never reaches them, and one whose commit fails
    # leaves a step the next leader repeats harmlessly (adding a recorded key that
    # exists, naming the recorded current key, deleting a key already gone).

    def check_master_keys(self, *, farm: Farm | None = None) -> list[Applied]:
        """The master-key part of the rollover check: finish a roll cut short, roll a key
        that reached its lifetime, re-seal, delete keys past their retention."""
        if farm is None:
            farm = self._farm_and_key()
        done: list[Applied] = []
        with Directory(self._config.directory, _ONE_ATTEMPT) as once:
            try:
                named_in_policy = once.current_key_id(farm.dkm_group)
            except DirectoryError as exc:
                log.warning("master-key check skipped, the directory is unavailable: %s", exc.what)
                return done
            keys = self._db.master_keys()
            named, now = self._named_by_live()
            current = policy.current_key(keys)
            pending = any(k.state == "pending" for k in keys)
            if current is not None and not pending and named_in_policy != current.id:
                done.append(self._repair_policy(farm, once, current.id, named_in_policy))
            actions = policy.decide_master_keys(
                self._config.master_key, self._config.policy, now, keys, named
            )
            for action in actions:
                if action.kind in ("finish", "roll"):
                    self._roll(farm, once, urgent=False, request=None, reason=action.reason)
                    done.append(Applied("roll", "master key", str(action.key_id), action.reason))
                elif action.kind == "reseal":
                    count = self._reseal_into_current(farm)
                    done.append(
                        Applied("reseal", "master key", str(action.key_id), f"{count} blobs")
                    )
                elif action.kind == "unused":
                    self._mark_unused(farm, action.key_id)
                elif action.kind == "delete":
                    detail = self._delete_key(farm, once, action.key_id, action.reason)
                    done.append(Applied("delete", "master key", str(action.key_id), detail))
        for step in done:
            log.info("master keys: %s", step)
        return done

    def roll_master_key(self, farm: Farm, *, urgent: bool, request: int | None) -> list[str]:
        """Roll the master key now (`farmkeys rollover --master-key`); the answer's lines.

        A request that a roll already answered (its leader stopped before
        marking the request done) is answered from the record.
        """
        reason = "requested by the operator" + (" (urgent)" if urgent else "")
        if self._key is None:
            self._refresh_key(farm)
        with Directory(self._config.directory, _ONE_ATTEMPT) as once:
            once.current_key_id(farm.dkm_group)  # reachable, before anything is recorded
            keys = self._db.master_keys()
            done = next((k for k in keys if request is not None and k.request == request), None)
            if done is not None and done.state != "pending":
                return [f"master key {done.id} was made current for this request"]
            return self._roll(farm, once, urgent=urgent, request=request, reason=reason)

    def _named_by_live(self) -> tuple[set[uuid.UUID], datetime]:
        """The master keys the live blobs are sealed under, and the database's clock."""
        rows = self._db.fetch(
            "SELECT now() AS now, array(SELECT DISTINCT master_key FROM certificate"
            " WHERE role <> 'archived') AS named"
        )
        return set(rows[0]["named"]), rows[0]["now"]

    def _step(self, step: str, key_id: uuid.UUID) -> None:
        log.info("master-key roll: %s %s", step, key_id)
        if self._on_step is not None:
            self._on_step(step, key_id)

    def _roll(
        self, farm: Farm, once: Directory, *, urgent: bool, request: int | None, reason: str
    ) -> list[str]:
        """Every step of a roll, from wherever the journal says it stands."""
        group = farm.dkm_group
        pending = next((k for k in self._db.master_keys() if k.state == "pending"), None)
        if pending is None:
            key_id = uuid.uuid4()
            with self._fenced(farm) as fence:
                fence.tx.record_master_key(
                    key_id, state="pending", urgent=urgent, request=request, reason=reason
                )
            self._step("recorded", key_id)
        else:
            key_id = pending.id
            if request is not None or (urgent and not pending.urgent):
                with self._fenced(farm) as fence:
                    fence.tx.execute(
                        "UPDATE master_key SET request = coalesce(request, %s),"
                        " urgent = urgent OR %s WHERE id = %s",
                        (request, urgent, key_id),
                    )
            if pending.urgent and not urgent:
                # The table's flag is a DB writer's to set, and an urgent finish deletes the
                # replaced key at once (irreversible): only an authenticated request's counts.
                log.warning(
                    "finishing master-key roll %s without deleting the replaced key at once;"
                    " if it must go now, run `farmkeys rollover --master-key --urgent` again",
                    key_id,
                )

        with self._fenced(farm) as fence:
            if once.ensure_key(group, key_id):
                self._audit_key(fence, "master_key_add", key_id, reason)
        self._step("added", key_id)
        new_key = self._directory.master_key(group, key_id)  # read back what the directory holds

        olds = self._live_keys(farm, exclude=key_id)
        with self._fenced(farm) as fence:
            if self._reseal(fence, farm, fence.tx.live_certificates(), key_id, new_key, olds):
                fence.tx.notify(CHANGED_CHANNEL, f"term {fence.term}")
        self._step("resealed", key_id)

        with self._fenced(farm, key=(key_id, new_key)) as fence:
            rows = fence.tx.live_certificates()
            # A sweep: nothing else seals between two steps of one roll, so this finds
            # nothing unless a fault intervened; a key not read then comes from the cache.
            self._reseal(fence, farm, rows, key_id, new_key, olds)
            replaced_key = policy.current_key(fence.tx.master_keys())
            replaced = None if replaced_key is None else replaced_key.id
            if self._before is not None:  # the authenticated current key, not the table's
                replaced = self._before.master_key
            if replaced is not None and replaced != key_id:
                self._replacing.append(
                    farm_state.Replaced(replaced, int(fence.now.timestamp()), urgent)
                )
            once.set_current_key(group, key_id)
            fence.tx.execute(
                "UPDATE master_key SET state = 'previous', replaced_at = now(),"
                " unused_since = now(), delete_now = %s WHERE state = 'current'",
                (urgent,),
            )
            fence.tx.execute(
                "UPDATE master_key SET state = 'current', current_since = now() WHERE id = %s",
                (key_id,),
            )
            self._audit_key(
                fence,
                "master_key_roll",
                key_id,
                f"made current, replacing {replaced}; {len(rows)} live blobs sealed under it;"
                f" {reason}",
            )
            fence.tx.notify(CHANGED_CHANNEL, f"term {fence.term}")
        self._key = (key_id, new_key)
        self._step("current", key_id)

        lines = [f"master key {key_id} is now current; {len(rows)} live blobs are sealed under it"]
        if replaced is None:
            return lines
        if urgent:
            lines.append(self._delete_key(farm, once, replaced, "replaced urgently"))
            lines.append(
                "if the config DB may have leaked too, the certificates themselves must be"
                " replaced: run `farmkeys rollover --urgent`"
            )
        else:
            retain = policy.describe_units(self._config.master_key.retain, self._config.policy)
            lines.append(
                f"master key {replaced} is replaced; it stays in the directory for {retain}"
                " after no live blob names it, so a config DB backup of that period still opens"
            )
        return lines

    def _live_keys(self, farm: Farm, *, exclude: uuid.UUID) -> dict[uuid.UUID, bytes]:
        """The bytes of every master key a live blob names, read before a transaction opens."""
        named, _ = self._named_by_live()
        return {k: self._directory.master_key(farm.dkm_group, k) for k in named - {exclude}}

    def _reseal(
        self,
        fence: Fence,
        farm: Farm,
        rows: Sequence[CertificateRow],
        key_id: uuid.UUID,
        key: bytes,
        olds: dict[uuid.UUID, bytes],
    ) -> int:
        """Seal every row not yet under ``key_id`` again under it; how many were."""
        count = 0
        for row in rows:
            if row.master_key == key_id:
                continue
            old = olds.get(row.master_key)
            if old is None:  # sealed after olds was read: one more (cached) read
                old = self._directory.master_key(farm.dkm_group, row.master_key)
            blob = blob_format.reseal(
                row.blob,
                old_key=old,
                new_key=key,
                new_key_id=key_id,
                context=blob_context(farm, row.id, row.purpose),
            )
            fence.tx.set_blob(row.id, master_key=key_id, blob=blob)
            count += 1
        return count

    def _reseal_into_current(self, farm: Farm) -> int:
        key_id, key = self._current_key()
        olds = self._live_keys(farm, exclude=key_id)
        with self._fenced(farm) as fence:
            count = self._reseal(fence, farm, fence.tx.live_certificates(), key_id, key, olds)
            if count:
                self._audit_key(fence, "master_key_reseal", key_id, f"{count} live blobs")
                fence.tx.notify(CHANGED_CHANNEL, f"term {fence.term}")
        return count

    def _mark_unused(self, farm: Farm, key_id: uuid.UUID) -> None:
        with self._fenced(farm) as fence:
            fence.tx.execute(
                "UPDATE master_key SET unused_since = now() WHERE id = %s AND state = 'previous'"
                " AND unused_since IS NULL AND NOT EXISTS (SELECT 1 FROM certificate"
                " WHERE master_key = %s AND role <> 'archived')",
                (key_id, key_id),
            )

    def _delete_key(self, farm: Farm, once: Directory, key_id: uuid.UUID, reason: str) -> str:
        """Delete a replaced key from the directory: what was sealed under it is gone."""
        with self._fenced(farm) as fence:
            # The lease row is locked: no leader can seal under this key meanwhile.
            counts = fence.tx.execute(
                "SELECT count(*) FILTER (WHERE role <> 'archived') AS live,"
                " count(*) FILTER (WHERE role = 'archived') AS archived"
                " FROM certificate WHERE master_key = %s",
                (key_id,),
            )[0]
            state = fence.tx.execute("SELECT state FROM master_key WHERE id = %s", (key_id,))
            if counts["live"] or not state or state[0]["state"] != "previous":
                return f"master key {key_id} was not deleted: it is not a replaced, unused key"
            held = self._deletion_held(fence, key_id)
            if held is not None:
                log.warning("%s", held)
                return held
            once.delete_key(farm.dkm_group, key_id)
            self._shredding.add(key_id)  # the tombstone, in the record this commit writes
            fence.tx.execute(
                "UPDATE master_key SET state = 'deleted', deleted_at = now() WHERE id = %s",
                (key_id,),
            )
            line = (
                f"master key {key_id} is deleted from the directory ({reason}): the"
                f" {counts['archived']} archived certificates sealed under it can never be"
                " opened again"
            )
            self._audit_key(fence, "master_key_delete", key_id, line)
        self._directory.forget(farm.dkm_group, key_id)
        self._step("deleted", key_id)
        return line

    def _deletion_held(self, fence: Fence, key_id: uuid.UUID) -> str | None:
        """Why the authenticated farm state forbids deleting ``key_id`` now, or None.

        Deleting a master key is irreversible, and the ``master_key`` table that schedules
        it (``delete_now``, ``unused_since``) is a DB writer's to edit: the key must be one
        the record lists as replaced (urgently, or ``retain`` ago), neither the record's
        current key nor named by a live entry."""
        before = self._before
        entry = None if before is None else before.replaced_key(key_id)
        if before is None or entry is None:
            return (
                f"master key {key_id} was not deleted: the authenticated farm state does not"
                " record it as replaced"
            )
        if key_id == before.master_key or any(e.master_key == key_id for e in before.live):
            return f"master key {key_id} was not deleted: the authenticated farm state uses it"
        retain = self._config.policy.units(self._config.master_key.retain).total_seconds()
        due = entry.at + int(retain)
        if not entry.urgent and int(fence.now.timestamp()) < due:
            return (
                f"master key {key_id} was not deleted: the authenticated farm state shows it"
                f" replaced at {entry.at}, so it is kept until {due} (its retention)"
            )
        return None

    def _repair_policy(
        self, farm: Farm, once: Directory, current: uuid.UUID, found: uuid.UUID
    ) -> Applied:
        """CryptoPolicy names another key than the farm's record: name the recorded one."""
        with self._fenced(farm) as fence:
            if self._before is not None and self._before.master_key != current:
                # The table is a DB writer's to edit; the authenticated record is under the
                # key the leader last made current. The directory is left as it is.
                detail = (
                    f"the master_key table names {current} current, but the authenticated farm"
                    f" state is under {self._before.master_key}: CryptoPolicy ({found}) left"
                    " as it is"
                )
                log.warning("%s", detail)
                return Applied("policy", "master key", str(current), detail)
            once.set_current_key(farm.dkm_group, current)
            detail = f"CryptoPolicy named {found}, not the current key; corrected"
            self._audit_key(fence, "master_key_policy", current, detail)
        return Applied("policy", "master key", str(current), detail)

    def _adopt(self, farm: Farm) -> uuid.UUID:
        """Record the keys a farm's directory holds, for a farm made before they were."""
        group = farm.dkm_group
        current = self._directory.current_key_id(group)
        infos = self._directory.list_keys(group)
        if current not in {i.id for i in infos}:
            raise DirectoryError(
                f"the CryptoPolicy of DKM group {group} names master key {current}, which the"
                " directory does not hold",
                "restore the DKM container from a directory backup or an escrow file",
            )
        with self._election.fenced(self._db) as fence:
            recorded = {k.id: k for k in fence.tx.master_keys()}
            have = policy.current_key(recorded.values())
            if have is not None:
                return have.id
            for info in infos:
                if info.id in recorded:
                    continue
                fence.tx.record_master_key(
                    info.id,
                    state="current" if info.id == current else "previous",
                    created_at=info.created_at,
                    reason="adopted from the directory",
                )
            self._audit_key(
                fence, "master_key_adopt", current, f"{len(infos)} keys recorded from the directory"
            )
        return current

    def _audit_key(self, fence: Fence, action: str, key_id: uuid.UUID, detail: str) -> None:
        fence.tx.audit(
            node=self._election.node_id,
            term=fence.term,
            action=action,
            master_key=key_id,
            detail=detail,
        )

    # -- operator requests -------------------------------------------------------------
    #
    # A row of rollover_request is a letter box anyone who writes the config DB can fill.
    # The leader acts only on a request's signed body (farmkeys.requests), after checking
    # its MAC, that the row's columns say the same, that it has not expired, and that the
    # authentic farm state does not list its nonce as answered; the nonce goes into the
    # record written with the answer. Any other row is answered "refused", audited as
    # request_refused with the requester the row claims, and nothing else is done.

    def answer_requests(self, *, farm: Farm | None = None) -> int:
        """Carry out every pending request that is authentic, refuse the rest; how many
        were answered.

        ``farm``: given by :meth:`tick`, which has just read the master key.
        """
        if farm is None:
            farm = self._farm_and_key()
        answered = 0
        while True:
            row = self._next_request()
            if row is None:
                return answered
            try:
                request = self._authenticate(farm, row)
                lines = self._answer_one(farm, row, request)
                if lines is None:
                    continue  # another process took the row meanwhile
                if request.kind == "master_key":
                    # A master-key roll spans several fenced steps: answered after the last.
                    lines = self.roll_master_key(farm, urgent=request.urgent, request=row["id"])
                    with self._fenced(farm) as fence:
                        self._answered(fence, row["id"], lines, signed=request)
            except _NeedKey as need:
                self._make_spare(need.purpose)
                continue
            except RequestRefusedError as exc:
                self._refuse(row, exc)
                answered += 1
                continue
            except FarmStateError as exc:
                # No change can be built on rows that fail their farm state: the request is
                # answered with why, so the operator learns it at once.
                if row["repair_state"]:
                    raise
                with self._election.fenced(self._db) as fence:
                    self._answered(fence, row["id"], [f"refused: {exc.what}"], ok=False)
                answered += 1
                continue
            answered += 1
            log.info("request %d answered: %s", row["id"], "; ".join(lines))

    _COLUMNS = (
        "SELECT id, requested_by, purpose, urgent, master_key, repair_state,"
        " import_certificate, import_blob, import_role, import_source, body, mac"
        " FROM rollover_request WHERE done_at IS NULL"
    )
    _REQUEST = _COLUMNS + " ORDER BY id LIMIT 1"

    def _next_request(self) -> dict[str, Any] | None:
        """The oldest pending request, read outside any transaction."""
        rows = self._db.fetch(self._REQUEST)
        return rows[0] if rows else None

    def _authenticate(self, farm: Farm, row: dict[str, Any]) -> request_format.Request:
        """The request a row carries, once its MAC verifies and its columns agree with it
        (read outside any transaction: the key may come from the directory);
        :class:`RequestRefusedError` otherwise. Freshness and replay are judged in the
        fenced transaction that carries it out (:meth:`_admit`)."""
        request = request_format.verify(
            row["body"],
            row["mac"],
            farm=farm.dkm_group,
            row_id=row["id"],
            key_for=lambda key_id: self._key_bytes(farm, key_id),
        )
        if request_format.columns_differ(request, row):
            raise RequestRefusedError(
                f"request {row['id']}'s columns do not say what its signed body says"
                f" ({request.describe()})",
                "someone who can write the config DB changed it; nothing was done. Find out"
                " who, and re-issue the request if it was yours",
            )
        return request

    def _admit(self, fence: Fence, request: request_format.Request) -> None:
        """Refuse, in the fenced transaction that would carry it out, a request that has
        expired or that the authentic farm state lists as answered (a copy of an earlier
        row put back in the queue)."""
        request_format.check_fresh(request, now=int(fence.now.timestamp()))
        if self._before is not None and self._before.has_answered(request.nonce):
            raise RequestRefusedError(
                f"request {request.id} ({request.describe()}) was answered before: this is"
                " a copy of it put back in the queue",
                "nothing was done; someone who can write the config DB replayed it",
            )

    def _same_row(self, fence: Fence, row: dict[str, Any]) -> bool:
        """The row is still pending exactly as it was authenticated, and now locked for this
        transaction (False: another process answered it, or it was changed meanwhile, and
        is authenticated again on the next round)."""
        locked = fence.tx.execute(
            self._COLUMNS + " AND id = %s FOR UPDATE SKIP LOCKED", (row["id"],)
        )
        return bool(locked) and locked[0] == row

    def _answer_one(
        self, farm: Farm, row: dict[str, Any], request: request_format.Request
    ) -> list[str] | None:
        """Carry out one authentic request in one fenced transaction (a master-key roll:
        only admit it; its steps follow); the answer's lines, None if the row was gone."""
        if request.kind == "repair_state":
            with self._election.fenced(self._db) as fence:
                if not self._same_row(fence, row):
                    return None
                lines = self._repair_state(fence, farm, request)
                self._answered(fence, row["id"], lines)
                return lines
        with self._fenced(farm) as fence:
            if not self._same_row(fence, row):
                return None
            self._admit(fence, request)
            if request.kind == "master_key":
                return []
            if request.kind == "import":
                ok, line = self._import(fence, farm, row, request)
                lines = [line]
                self._answered(fence, row["id"], lines, ok=ok, signed=request)
                return lines
            assert request.purpose is not None
            purposes = PURPOSES if request.purpose == "all" else (request.purpose,)
            rows = fence.tx.live_certificates()
            lines = [
                self._requested(fence, farm, rows, purpose, urgent=request.urgent)
                for purpose in purposes
            ]
            self._answered(fence, row["id"], lines, signed=request)
            return lines

    def _refuse(self, row: dict[str, Any], exc: RequestRefusedError) -> None:
        """Answer a request the leader will not act on, and audit why."""
        log.warning("request %d refused: %s", row["id"], exc.what)
        with self._election.fenced(self._db) as fence:
            fence.tx.audit(
                node=self._election.node_id,
                term=fence.term,
                action="request_refused",
                detail=f"request {row['id']} (claimed requester {row['requested_by']!r}):"
                f" {exc.what}",
            )
            self._answered(fence, row["id"], [f"refused: {exc.what}"], ok=False)

    def _repair_state(self, fence: Fence, farm: Farm, request: request_format.Request) -> list[str]:
        """`farmkeys repair-state`: authenticate exactly the live rows the operator reviewed
        as the farm state.

        The request's MAC covers a digest of those rows; if they changed since, nothing is
        written. Nothing revoked is ever dropped: the last record that still verifies keeps
        its revoked list and tombstones, the operator's list adds to it, and when no record
        verifies the operator must have named the revoked thumbprints. A live certificate
        in the revoked list is archived again, never made live. The version is one above
        the last authentic one, or the operator's floor (above what nodes installed after
        a restored backup), at most :data:`farmstate.MAX_VERSION_STEP` above it.
        """
        terms = request.repair
        assert terms is not None
        request_format.check_fresh(request, now=int(fence.now.timestamp()))
        stored = fence.tx.stored_state()
        previous: farm_state.FarmState | None = None
        why = "the config DB has no farm state record"
        if stored is not None:
            try:
                previous = farm_state.verify(
                    stored.body,
                    stored.mac,
                    farm=farm.dkm_group,
                    key_for=lambda key_id: self._key_bytes(farm, key_id),
                )
            except (FarmStateError, DirectoryError) as exc:
                why = exc.what
        if previous is not None and previous.has_answered(request.nonce):
            raise RequestRefusedError(
                f"request {request.id} (repair-state) was answered before: this is a copy of"
                " it put back in the queue",
                "nothing was done; someone who can write the config DB replayed it",
            )
        rows = fence.tx.live_certificates()
        if request_format.rows_digest(farm_state.LiveEntry.of(r) for r in rows) != terms.rows:
            raise RequestRefusedError(
                "the config DB's live certificates changed since the operator reviewed them",
                "nothing was written; run `farmkeys repair-state` again and review them anew",
            )
        if previous is None and not terms.revoked_named:
            raise RequestRefusedError(
                f"no farm state record verifies ({why}), so its revoked list is unknown",
                "name the urgently replaced thumbprints to keep with `farmkeys repair-state"
                " --revoked FILE`; nothing was written",
            )
        floor = 0 if previous is None else previous.version
        version = max(floor + 1, terms.min_version)
        if version > floor + farm_state.MAX_VERSION_STEP:
            raise RequestRefusedError(
                f"repair-state asks for farm state version {version}, more than"
                f" {farm_state.MAX_VERSION_STEP} above the last authentic version {floor}",
                "nothing was written; a node row reporting such a version is forged",
            )
        revoked = set(terms.revoked) | (set(previous.revoked) if previous is not None else set())
        shredded = (
            set(previous.shredded)
            if previous is not None and previous.format != farm_state.FORMAT_1
            else self._tombstones(fence)
        )
        lines = []
        for row in rows:
            if row.thumbprint in revoked:
                fence.tx.set_role(row.id, "archived")
                detail = "urgently replaced before; archived again by repair-state"
                self._audit(fence, "archive", row.purpose, row.id, row.thumbprint, detail)
                lines.append(f"{row.purpose} {row.role} {row.thumbprint}: {detail}")
        rows = fence.tx.live_certificates()
        if previous is None:
            lines.append(f"no farm state verified ({why}); the live rows are authenticated")
        else:
            lines.extend(
                f"differs from version {previous.version}: {line}"
                for line in previous.differences(rows)
            )
        self._before, self._answering = previous, [self._answer_entry(request)]
        state = self._write_state(
            fence,
            farm,
            previous,
            key=None,
            revoked=revoked,
            shredded=shredded,
            version=version,
            action="state_repair",
        )
        self._answering = []
        assert state is not None
        fence.tx.notify(CHANGED_CHANNEL, f"term {fence.term}")
        live = ", ".join(e.describe() for e in state.live) or "none"
        lines.append(f"farm state version {state.version} written: {live}")
        return lines

    @staticmethod
    def _answer_entry(request: request_format.Request) -> farm_state.Answered:
        return farm_state.Answered(request.nonce, request.expires)

    def _answered(
        self,
        fence: Fence,
        request_id: int,
        lines: Sequence[str],
        *,
        ok: bool = True,
        signed: request_format.Request | None = None,
    ) -> None:
        """Record the answer; a ``signed`` request's nonce goes into the farm state record
        the transaction writes (a :meth:`_fenced` one), so a copy of it is refused."""
        if signed is not None:
            self._answering.append(self._answer_entry(signed))
        fence.tx.execute(
            "UPDATE rollover_request SET done_at = now(), done_by = %s, term = %s,"
            " ok = %s, result = %s WHERE id = %s AND done_at IS NULL",
            (self._election.node_id, fence.term, ok, "\n".join(lines), request_id),
        )
        fence.tx.notify(CHANGED_CHANNEL, f"term {fence.term}")

    def _requested(
        self,
        fence: Fence,
        farm: Farm,
        rows: Sequence[CertificateRow],
        purpose: str,
        *,
        urgent: bool,
    ) -> str:
        mine = [r for r in rows if r.purpose == purpose]
        reason = "requested by the operator" + (" (urgent)" if urgent else "")
        if urgent:
            # AD FS's -Urgent: the replaced primary, and any secondary made before it,
            # are archived at once, not kept installed.
            for row in mine:
                if row.role in ("primary", "secondary"):
                    fence.tx.set_role(row.id, "archived")
                    self._revoking.add(row.thumbprint)  # no node installs it again
                    self._audit(
                        fence, "archive", purpose, row.id, row.thumbprint, f"replaced: {reason}"
                    )
            made = self._generate(fence, farm, purpose, "primary", reason)
            return f"{purpose}: new primary {made.thumbprint}; the replaced certificates archived"
        secondary = next((r for r in mine if r.role == "secondary"), None)
        if secondary is not None:
            return f"{purpose}: already has secondary {secondary.thumbprint}; nothing done"
        made = self._generate(fence, farm, purpose, "secondary", reason)
        return f"{purpose}: new secondary {made.thumbprint}"

    def _import(
        self, fence: Fence, farm: Farm, row: dict[str, Any], request: request_format.Request
    ) -> tuple[bool, str]:
        """Carry out a `farmkeys import adfs` request: (done, the answer's line).

        The certificate arrives sealed under a master key of this farm and bound
        to the id its row gets; it is opened, checked again (another import may
        have brought it meanwhile), sealed under the current key and inserted.
        A refusal changes nothing but the request's answer. Everything but the
        blob comes from the signed request; the blob is the one its digest names.
        """
        terms = request.import_
        assert terms is not None
        assert request.purpose is not None
        purpose, role, cert_id = request.purpose, terms.role, terms.certificate
        blob = bytes(row["import_blob"])
        context = blob_context(farm, cert_id, purpose)
        try:
            sealed_under = blob_format.master_key_id(blob, context=context)
            pkcs12 = blob_format.open_blob(
                blob,
                master_key=self._directory.master_key(farm.dkm_group, sealed_under),
                context=context,
            )
            generated = certificates.from_pkcs12(pkcs12)
            certificates.check_importable(
                generated.certificate, generated.key, purpose=purpose, now=fence.now
            )
        except (InvalidBlobError, CertificateError, MasterKeyMissingError) as exc:
            return False, f"import refused: {exc.what}"
        thumb = certificates.thumbprint(generated.certificate)
        conflict = import_conflict(
            fence.tx.execute, thumbprint=thumb, purpose=purpose, role=role, certificate_id=cert_id
        )
        if conflict is not None:
            return False, f"import refused: {conflict}"
        key_id, key = self._current_key()  # raising rolls the transaction back
        reason = f"imported from {terms.source}"
        if role == "primary":
            self._retire_primary(fence, fence.tx.live_certificates(), purpose, reason=reason)
        made = sealed_certificate(
            self._config,
            dkm_group=farm.dkm_group,
            certificate_id=cert_id,
            purpose=purpose,
            role=role,
            generated=generated,
            master_key_id=key_id,
            master_key=key,
        )
        fence.tx.insert_certificate(made)
        self._audit(fence, "import", purpose, made.id, thumb, reason)
        return True, f"{purpose}: imported {thumb} as the {role}"


def import_conflict(
    execute: Callable[[str, tuple[Any, ...]], list[dict[str, Any]]],
    *,
    thumbprint: str,
    purpose: str,
    role: str,
    certificate_id: uuid.UUID | None = None,
) -> str | None:
    """Why the farm has no room for an imported certificate, or None: it (or its row id) is
    already in the farm, or it would be a second secondary of its purpose. ``execute`` runs
    a query: the CLI's connection before it asks, the leader's fenced transaction after."""
    known = execute(
        "SELECT role FROM certificate WHERE thumbprint = %s OR id = %s",
        (thumbprint, certificate_id),
    )
    if known:
        return f"certificate {thumbprint} is already in the farm ({known[0]['role']})"
    if role == "secondary":
        secondary = execute(
            "SELECT thumbprint FROM certificate WHERE purpose = %s AND role = 'secondary'",
            (purpose,),
        )
        if secondary:
            return (
                f"the farm already has a secondary {purpose} certificate"
                f" {secondary[0]['thumbprint']}"
            )
    return None


# -- rollover on request -----------------------------------------------------------------


@dataclass(frozen=True)
class RolloverOutcome:
    request: int
    ok: bool
    done_by: str | None
    term: int | None
    result: str


def request_rollover(
    config: Config,
    db: ConfigDB,
    directory: Directory,
    *,
    purpose: str | None,
    urgent: bool,
    timeout_seconds: float,
    repair: request_format.RepairTerms | None = None,
) -> RolloverOutcome:
    """Ask the leader for a rollover and wait for its answer.

    ``purpose`` None asks for a master-key rollover (`--master-key`);
    ``repair`` for `farmkeys repair-state` instead, vouching for those terms.

    When no process holds the lease, take it for the operation, answer the
    request under the fence, and give the lease back. Either way exactly one
    writer acts. A request nobody answered in time is withdrawn, so it cannot
    surprise anyone later.
    """
    kind = "repair_state" if repair is not None else "master_key" if purpose is None else "rollover"
    request = file_request(
        config,
        db,
        directory,
        kind=kind,
        purpose="all" if repair is not None else purpose,
        urgent=urgent,
        lifetime_seconds=timeout_seconds,
        repair=repair,
    )
    return await_answer(config, db, directory, request, timeout_seconds=timeout_seconds)


# A request stays valid this much longer than its maker waits for the answer.
_LIFETIME_MARGIN_SECONDS = 60


def file_request(
    config: Config,
    db: ConfigDB,
    directory: Directory,
    *,
    kind: str,
    purpose: str | None,
    urgent: bool,
    lifetime_seconds: float,
    repair: request_format.RepairTerms | None = None,
    import_: tuple[request_format.ImportTerms, bytes] | None = None,
) -> int:
    """Sign a request under the farm's current master key (the one the directory's
    CryptoPolicy names, not the config DB's word) and queue it; its id.

    It stays valid for ``lifetime_seconds`` and a minute more (at most
    :data:`farmkeys.requests.MAX_LIFETIME_SECONDS`), by the config DB's clock.
    """
    farm = db.require_farm()
    key_id = directory.current_key_id(farm.dkm_group)
    key = directory.master_key(farm.dkm_group, key_id)
    nonce = uuid.uuid4()
    lifetime = min(
        int(lifetime_seconds) + _LIFETIME_MARGIN_SECONDS, request_format.MAX_LIFETIME_SECONDS
    )

    def sign(request_id: int, now: datetime) -> tuple[bytes, bytes]:
        created = int(now.timestamp())
        request = request_format.Request(
            id=request_id,
            nonce=nonce,
            farm=farm.dkm_group,
            kind=kind,
            purpose=purpose,
            urgent=urgent,
            requested_by=config.node.id,
            created=created,
            expires=created + lifetime,
            master_key=key_id,
            repair=repair,
            import_=None if import_ is None else import_[0],
        )
        return request_format.sign(request, key)

    terms = None if import_ is None else import_[0]
    return db.file_request(
        node_id=config.node.id,
        purpose=purpose,
        urgent=urgent,
        master_key=kind == "master_key",
        repair_state=kind == "repair_state",
        import_=None
        if import_ is None or terms is None
        else (terms.certificate, import_[1], terms.role, terms.source),
        sign=sign,
    )


def await_answer(
    config: Config,
    db: ConfigDB,
    directory: Directory,
    request: int,
    *,
    timeout_seconds: float,
) -> RolloverOutcome:
    """Wait for the leader's answer to ``request``, or answer it under the lease when no
    process holds it; withdraw it when nobody answered within ``timeout_seconds``."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        row = db.rollover_request(request)
        if row["done_at"] is not None:
            return RolloverOutcome(
                request, bool(row["ok"]), row["done_by"], row["term"], row["result"] or ""
            )
        if not read_lease(db).valid:
            election = Election(db, node_id=config.node.id, lease=config.lease)
            if election.try_acquire():
                log.info("no node leads; %s took the lease for request %d", config.node.id, request)
                try:
                    Leader(config, db, directory, election).answer_requests()
                except Error as exc:
                    _withdraw(db, request, f"withdrawn: {exc.what}")
                    raise
                finally:
                    election.release()
                continue
        if time.monotonic() >= deadline:
            if _withdraw(db, request, "withdrawn: no leader answered in time"):
                lease = read_lease(db)
                raise LeaderTimeoutError(
                    f"the leader ({lease.holder_node or 'none'}) did not answer request"
                    f" {request} within {timeout_seconds:.0f} s; it was withdrawn",
                    "check `farmkeys serve` on the leader (`farmkeys status`), then try again",
                )
            continue  # answered as we withdrew it: report the answer
        time.sleep(0.2)


def _withdraw(db: ConfigDB, request: int, why: str) -> bool:
    """Mark a request that nobody carried out as done and failed; False if it was answered."""
    rows = db.fetch(
        "UPDATE rollover_request SET done_at = now(), ok = false, result = %s"
        " WHERE id = %s AND done_at IS NULL RETURNING id",
        (why, request),
    )
    return bool(rows)
