"""The leader's fence and the farm state record it writes.

Every leader write runs in :meth:`StateFence.fenced`: the election's fenced transaction
(:mod:`farmkeys.election`), which first checks the farm state record against the
certificate rows, so a leader never builds on rows a config-DB writer changed behind its
back, and which ends by writing the next record when the live set changed. What a step
adds to that record (a thumbprint revoked, a master key shredded or replaced, a request
answered) is collected in the open transaction's :class:`Round`.

The next version is always one above the last authentic record's: never the
``farm_state.version`` column nor a node's reported version, both a DB writer's to set.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from farmkeys.db import CertificateRow, ConfigDB, Farm, Transaction
from farmkeys.election import Election, Fence
from farmkeys.errors import FarmStateError
from farmkeys.formats import farm_state
from farmkeys.leader.keys import CurrentKey
from farmkeys.vocab import AuditAction


@dataclass(frozen=True)
class _Lists:
    revoked: set[str]
    shredded: set[uuid.UUID]
    replaced: list[farm_state.Replaced]


@dataclass
class Round:
    """What the steps of one fenced transaction add to the record it writes."""

    before: farm_state.FarmState | None = None  # the authentic record it started from
    revoking: set[str] = field(default_factory=set)  # thumbprints replaced urgently
    shredding: set[uuid.UUID] = field(default_factory=set)  # master keys deleted
    answering: list[farm_state.Answered] = field(default_factory=list)  # requests answered
    replacing: list[farm_state.Replaced] = field(default_factory=list)  # master keys replaced
    promoting: list[farm_state.Promotion] = field(default_factory=list)  # primaries changed
    reverting: set[str] = field(default_factory=set)  # purposes whose promotion was undone
    holding: list[farm_state.Hold] = field(default_factory=list)  # holds a revert set
    releasing: set[str] = field(default_factory=set)  # purposes whose hold `rollover` lifted

    def promotions(self, before: farm_state.FarmState | None) -> list[farm_state.Promotion]:
        """The promotions the next record carries: ``before``'s, less those reverted, then
        this transaction's (the last for a purpose wins)."""
        kept = [] if before is None else list(before.promotions)
        return [p for p in kept if p.purpose not in self.reverting] + self.promoting

    def holds(self, before: farm_state.FarmState | None) -> list[farm_state.Hold]:
        """The holds the next record carries: ``before``'s, less those released, then this
        transaction's."""
        kept = [] if before is None else list(before.holds)
        return [h for h in kept if h.purpose not in self.releasing] + self.holding


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


def next_version(before: farm_state.FarmState | None) -> int:
    """One above the last authentic record's version (1 for a farm's first record).

    A version pushed to the bigint's end would freeze the farm, so never a column's or a
    node's (`status` flags either when it disagrees with the record)."""
    version = 1 if before is None else before.version + 1
    if version > farm_state.MAX_VERSION:
        raise FarmStateError(
            f"the farm state version cannot rise above {before.version if before else 0}",
            farm_state.REPAIR,
        )
    return version


class StateFence:
    """Fenced transactions that start from the authentic farm state and write the next."""

    def __init__(self, db: ConfigDB, election: Election, key: CurrentKey) -> None:
        self._db = db
        self._election = election
        self._key = key
        self.round = Round()

    @contextmanager
    def fenced(self, farm: Farm, *, key: tuple[uuid.UUID, bytes] | None = None) -> Iterator[Fence]:
        """A fenced transaction that starts by checking the farm state record and ends by
        writing the next one, under ``key`` (default: the current master key), when the
        live set changed or the record is under another key.

        Raises :class:`FarmStateError` and writes nothing when the config DB's rows do not
        match an authentic record (see `farmkeys repair-state`).
        """
        with self._election.fenced(self._db) as fence:
            self.round = Round()
            self.round.before = self.authentic_state(fence, farm)
            yield fence
            self.write(fence, farm, self.round.before, key=key)

    def authentic_state(self, fence: Fence, farm: Farm) -> farm_state.FarmState | None:
        """The config DB's farm state, verified and matching the live rows; None for a farm
        from before farm states, whose first record the next write makes."""
        stored = fence.tx.stored_state()
        if stored is None:
            if not fence.tx.had_state_record():
                return None
            raise FarmStateError(
                "the config DB has no farm state record, but this farm has had one",
                farm_state.REPAIR,
            )
        state = farm_state.verify(
            stored.body,
            stored.mac,
            farm=farm.dkm_group,
            key_for=lambda key_id: self._key.bytes_of(farm, key_id),
        )
        error = farm_state.mismatch(state, fence.tx.live_certificates())
        if error is not None:
            raise error
        return state

    def write(
        self,
        fence: Fence,
        farm: Farm,
        before: farm_state.FarmState | None,
        *,
        key: tuple[uuid.UUID, bytes] | None,
        revoked: set[str] | None = None,
        shredded: set[uuid.UUID] | None = None,
        version: int | None = None,
        action: AuditAction | None = None,
    ) -> farm_state.FarmState | None:
        """Write the next farm state record if it differs from ``before``; the one written.

        ``revoked`` and ``shredded``: the whole lists (repair-state), else ``before``'s and
        what this transaction replaced urgently or deleted. ``version``: the version to
        write (repair-state), else one above ``before``'s. ``action``: the audit action to
        record the write under (a farm's first record is ``state_adopt``).
        """
        rows = fence.tx.live_certificates()
        lists = self._lists(fence, before, revoked, shredded)
        known = key if key is not None else self._key.known  # None: not read (directory down)
        if action is None and self._unchanged(farm, before, rows, lists, known):
            return None  # nothing to write: no key needed
        key_id, key_bytes = known if known is not None else self._key.current()
        now = int(fence.now.timestamp())
        kept = () if before is None else before.answered
        state = farm_state.FarmState.build(
            farm=farm.dkm_group,
            version=next_version(before) if version is None else version,
            term=fence.term,
            master_key=key_id,
            rows=rows,
            revoked=lists.revoked,
            shredded=lists.shredded,
            # Expired requests are refused as stale anyway: a record keeps only the others.
            answered=[a for a in kept if a.expires >= now] + self.round.answering,
            replaced=lists.replaced,
            promotions=self.round.promotions(before),
            holds=self.round.holds(before),
        )
        body, mac = farm_state.seal(state, key_bytes)
        fence.tx.write_state(body=body, mac=mac, version=state.version, term=fence.term)
        if before is None and action is None:
            action = AuditAction.STATE_ADOPT
        if action is not None:
            fence.tx.audit(
                node=self._election.node_id,
                term=fence.term,
                action=action,
                master_key=key_id,
                detail=f"farm state version {state.version}: {len(state.live)} live certificates",
            )
        return state

    def _lists(
        self,
        fence: Fence,
        before: farm_state.FarmState | None,
        revoked: set[str] | None,
        shredded: set[uuid.UUID] | None,
    ) -> _Lists:
        """The revoked thumbprints, shredded and replaced master keys the next record
        carries: ``before``'s and this transaction's, unless given whole (repair-state)."""
        done = self.round
        if revoked is None:
            revoked = set(before.revoked if before is not None else ()) | done.revoking
        if shredded is None:
            shredded = done.shredding | self.shredded(fence, before)
        replaced = done.replacing + (
            list(before.replaced)
            if before is not None and before.format != farm_state.FORMAT_1
            else self._replaced_since_now(fence)
        )
        return _Lists(revoked, shredded, replaced)

    def _unchanged(
        self,
        farm: Farm,
        before: farm_state.FarmState | None,
        rows: Sequence[CertificateRow],
        lists: _Lists,
        known: tuple[uuid.UUID, bytes] | None,
    ) -> bool:
        """Whether ``before`` already says all the next record would (and is under the key
        the next would be under, when that key is known): then nothing is written."""
        if before is None or self.round.answering:
            return False
        same = farm_state.FarmState.build(
            farm=farm.dkm_group,
            version=before.version,
            term=before.term,
            master_key=before.master_key,
            rows=rows,
            revoked=lists.revoked,
            shredded=lists.shredded,
            answered=before.answered,
            replaced=lists.replaced,
            promotions=self.round.promotions(before),
            holds=self.round.holds(before),
        )
        return before.same_content(same) and (known is None or known[0] == before.master_key)

    def shredded(self, fence: Fence, before: farm_state.FarmState | None) -> set[uuid.UUID]:
        """The tombstones ``before`` carries; for a record of format 1 (which has none),
        the master keys the ``master_key`` table marks deleted. The table is a DB writer's
        to edit, so never the current key nor one a live blob names: a tombstone only keeps
        `escrow import` from restoring a key, so one too many can at worst refuse the
        restore of a key the farm no longer uses."""
        if before is not None and before.format != farm_state.FORMAT_1:
            return set(before.shredded)
        return fence.tx.deleted_keys_unnamed_by_live() - {self._key.id}

    def _replaced_since_now(self, fence: Fence) -> list[farm_state.Replaced]:
        """The replaced master keys to record when no record lists them yet (a farm's first
        record of format 2): those the ``master_key`` table marks ``previous``, replaced as
        of now. Later than the truth, so their deletion can only come later, never sooner."""
        now = int(fence.now.timestamp())
        return [farm_state.Replaced(key, now, False) for key in fence.tx.previous_keys()]
