"""The master key's lifecycle: roll it (yearly, or on request), seal the live blobs
again under the new key, name it in CryptoPolicy, and delete a replaced key once the
authenticated farm state says it may go.

The config DB's ``master_key`` table is the journal: a new key is recorded (``pending``)
before the directory holds it, and every later step is a fenced transaction. The
directory writes (add a key, name the current one in CryptoPolicy, delete a key) run
inside the fenced transaction whose commit records them, while it holds the lease row,
on a one-attempt connection: a leader that lost its lease never reaches them, and one
whose commit fails leaves a step the next leader repeats harmlessly (adding a recorded
key that exists, naming the recorded current key, deleting a key already gone).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from farmkeys import policy
from farmkeys.config import Config, RetryConfig
from farmkeys.db import CHANGED_CHANNEL, ConfigDB, Farm, MasterKeyRow
from farmkeys.directory import Directory
from farmkeys.election import Election, Fence
from farmkeys.errors import DirectoryError
from farmkeys.formats import farm_state
from farmkeys.leader.certificates import Applied
from farmkeys.leader.keys import CurrentKey
from farmkeys.leader.sealing import reseal
from farmkeys.leader.state import StateFence
from farmkeys.vocab import AuditAction, MasterKeyStage

log = logging.getLogger(__name__)

# The master-key check's own directory connection: one attempt, no retries, so an
# outage skips the check at once and a write under the lease row is bounded.
ONE_ATTEMPT = RetryConfig(total_seconds=0.0)


def deletion_held(
    before: farm_state.FarmState | None, key_id: uuid.UUID, *, now: int, retain_seconds: int
) -> str | None:
    """Why the authenticated farm state ``before`` forbids deleting ``key_id`` at ``now``
    (seconds since the epoch), or None.

    Deleting a master key is irreversible, and the ``master_key`` table that schedules it
    (``delete_now``, ``unused_since``) is a DB writer's to edit: the key must be one the
    record lists as replaced (urgently, or ``retain`` ago), neither the record's current
    key nor named by a live entry."""
    entry = None if before is None else before.replaced_key(key_id)
    if before is None or entry is None:
        return (
            f"master key {key_id} was not deleted: the authenticated farm state does not"
            " record it as replaced"
        )
    if key_id == before.master_key or any(e.master_key == key_id for e in before.live):
        return f"master key {key_id} was not deleted: the authenticated farm state uses it"
    due = entry.at + retain_seconds
    if not entry.urgent and now < due:
        return (
            f"master key {key_id} was not deleted: the authenticated farm state shows it"
            f" replaced at {entry.at}, so it is kept until {due} (its retention)"
        )
    return None


class MasterKeyLifecycle:
    """The master-key steps of the leader."""

    def __init__(
        self,
        config: Config,
        db: ConfigDB,
        directory: Directory,
        election: Election,
        state: StateFence,
        key: CurrentKey,
        *,
        on_step: Callable[[str, uuid.UUID], None] | None = None,
    ) -> None:
        self._config = config
        self._db = db
        self._directory = directory
        self._election = election
        self._state = state
        self._key = key
        self._on_step = on_step

    def check(self, farm: Farm) -> list[Applied]:
        """The master-key part of the rollover check: finish a roll cut short, roll a key
        that reached its lifetime, re-seal, delete keys past their retention."""
        done: list[Applied] = []
        with Directory(self._config.directory, ONE_ATTEMPT) as once:
            try:
                named_in_policy = once.current_key_id(farm.dkm_group)
            except DirectoryError as exc:
                log.warning("master-key check skipped, the directory is unavailable: %s", exc.what)
                return done
            keys = self._db.master_keys()
            named, now = self._db.keys_named_by_live()
            current = policy.current_key(keys)
            pending = any(k.stage == MasterKeyStage.PENDING for k in keys)
            if current is not None and not pending and named_in_policy != current.id:
                done.append(self._repair_policy(farm, once, current.id, named_in_policy))
            actions = policy.decide_master_keys(
                self._config.master_key, self._config.policy, now, keys, named
            )
            for action in actions:
                done.extend(self._carry_out(farm, once, action))
        for step in done:
            log.info("master keys: %s", step)
        return done

    def _carry_out(self, farm: Farm, once: Directory, action: policy.KeyAction) -> list[Applied]:
        key = str(action.key_id)
        if action.kind in ("finish", "roll"):
            self._roll(farm, once, urgent=False, request=None, reason=action.reason)
            return [Applied("roll", "master key", key, action.reason)]
        if action.kind == "reseal":
            count = self._reseal_into_current(farm)
            return [Applied("reseal", "master key", key, f"{count} blobs")]
        if action.kind == "unused":
            with self._state.fenced(farm) as fence:
                fence.tx.mark_unused(action.key_id)
            return []
        detail = self.delete(farm, once, action.key_id, action.reason)
        return [Applied("delete", "master key", key, detail)]

    def roll(self, farm: Farm, *, urgent: bool, request: int | None) -> list[str]:
        """Roll the master key now (`farmkeys rollover --master-key`); the answer's lines.

        A request that a roll already answered (its leader stopped before marking the
        request done) is answered from the record.
        """
        reason = "requested by the operator" + (" (urgent)" if urgent else "")
        with Directory(self._config.directory, ONE_ATTEMPT) as once:
            once.current_key_id(farm.dkm_group)  # reachable, before anything is recorded
            keys = self._db.master_keys()
            done = next((k for k in keys if request is not None and k.request == request), None)
            if done is not None and done.stage != MasterKeyStage.PENDING:
                return [f"master key {done.id} was made current for this request"]
            return self._roll(farm, once, urgent=urgent, request=request, reason=reason)

    def _step(self, step: str, key_id: uuid.UUID) -> None:
        log.info("master-key roll: %s %s", step, key_id)
        if self._on_step is not None:
            self._on_step(step, key_id)

    def _roll(
        self, farm: Farm, once: Directory, *, urgent: bool, request: int | None, reason: str
    ) -> list[str]:
        """Every step of a roll, from wherever the journal says it stands."""
        group = farm.dkm_group
        pending = next(
            (k for k in self._db.master_keys() if k.stage == MasterKeyStage.PENDING), None
        )
        key_id = self._record_pending(farm, pending, urgent=urgent, request=request, reason=reason)
        with self._state.fenced(farm) as fence:
            if once.ensure_key(group, key_id):
                self._audit_key(fence, AuditAction.MASTER_KEY_ADD, key_id, reason)
        self._step("added", key_id)
        new_key = self._directory.master_key(group, key_id)  # read back what the directory holds
        olds = self._live_keys(farm, exclude=key_id)
        with self._state.fenced(farm) as fence:
            rows = fence.tx.live_certificates()
            if reseal(fence.tx, self._directory, farm, rows, (key_id, new_key), olds):
                fence.tx.notify(CHANGED_CHANNEL, f"term {fence.term}")
        self._step("resealed", key_id)
        replaced, live = self._make_current(farm, once, (key_id, new_key), olds, urgent, reason)
        self._key.known = (key_id, new_key)
        self._step("current", key_id)
        lines = [f"master key {key_id} is now current; {live} live blobs are sealed under it"]
        if replaced is None:
            return lines
        if urgent:
            lines.append(self.delete(farm, once, replaced, "replaced urgently"))
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

    def _record_pending(
        self,
        farm: Farm,
        pending: MasterKeyRow | None,
        *,
        urgent: bool,
        request: int | None,
        reason: str,
    ) -> uuid.UUID:
        """The roll's new key: recorded now, or the one a roll cut short recorded."""
        if pending is None:
            key_id = uuid.uuid4()
            with self._state.fenced(farm) as fence:
                fence.tx.record_master_key(
                    key_id,
                    stage=MasterKeyStage.PENDING,
                    urgent=urgent,
                    request=request,
                    reason=reason,
                )
            self._step("recorded", key_id)
            return key_id
        if request is not None or (urgent and not pending.urgent):
            with self._state.fenced(farm) as fence:
                fence.tx.join_pending_roll(pending.id, request=request, urgent=urgent)
        if pending.urgent and not urgent:
            # The table's flag is a DB writer's to set, and an urgent finish deletes the
            # replaced key at once (irreversible): only an authenticated request's counts.
            log.warning(
                "finishing master-key roll %s without deleting the replaced key at once;"
                " if it must go now, run `farmkeys rollover --master-key --urgent` again",
                pending.id,
            )
        return pending.id

    def _make_current(
        self,
        farm: Farm,
        once: Directory,
        new: tuple[uuid.UUID, bytes],
        olds: dict[uuid.UUID, bytes],
        urgent: bool,
        reason: str,
    ) -> tuple[uuid.UUID | None, int]:
        """Name the new key current, in CryptoPolicy and the journal, and write the record
        under it: the key it replaced (None: none) and how many live blobs it seals."""
        key_id = new[0]
        with self._state.fenced(farm, key=new) as fence:
            rows = fence.tx.live_certificates()
            # A sweep: nothing else seals between two steps of one roll, so this finds
            # nothing unless a fault intervened; a key not read then comes from the cache.
            reseal(fence.tx, self._directory, farm, rows, new, olds)
            replaced_key = policy.current_key(fence.tx.master_keys())
            replaced = None if replaced_key is None else replaced_key.id
            before = self._state.round.before
            if before is not None:  # the authenticated current key, not the table's
                replaced = before.master_key
            if replaced is not None and replaced != key_id:
                self._state.round.replacing.append(
                    farm_state.Replaced(replaced, int(fence.now.timestamp()), urgent)
                )
            once.set_current_key(farm.dkm_group, key_id)
            fence.tx.make_current(key_id, urgent=urgent)
            self._audit_key(
                fence,
                AuditAction.MASTER_KEY_ROLL,
                key_id,
                f"made current, replacing {replaced}; {len(rows)} live blobs sealed under it;"
                f" {reason}",
            )
            fence.tx.notify(CHANGED_CHANNEL, f"term {fence.term}")
        return replaced, len(rows)

    def _live_keys(self, farm: Farm, *, exclude: uuid.UUID) -> dict[uuid.UUID, bytes]:
        """The bytes of every master key a live blob names, read before a transaction opens."""
        named, _ = self._db.keys_named_by_live()
        return {k: self._directory.master_key(farm.dkm_group, k) for k in named - {exclude}}

    def _reseal_into_current(self, farm: Farm) -> int:
        current = self._key.current()
        olds = self._live_keys(farm, exclude=current[0])
        with self._state.fenced(farm) as fence:
            rows = fence.tx.live_certificates()
            count = reseal(fence.tx, self._directory, farm, rows, current, olds)
            if count:
                detail = f"{count} live blobs"
                self._audit_key(fence, AuditAction.MASTER_KEY_RESEAL, current[0], detail)
                fence.tx.notify(CHANGED_CHANNEL, f"term {fence.term}")
        return count

    def delete(self, farm: Farm, once: Directory, key_id: uuid.UUID, reason: str) -> str:
        """Delete a replaced key from the directory: what was sealed under it is gone."""
        with self._state.fenced(farm) as fence:
            # The lease row is locked: no leader can seal under this key meanwhile.
            use = fence.tx.key_use(key_id)
            if use.live or fence.tx.key_stage(key_id) != MasterKeyStage.PREVIOUS:
                return f"master key {key_id} was not deleted: it is not a replaced, unused key"
            retain = self._config.policy.units(self._config.master_key.retain).total_seconds()
            held = deletion_held(
                self._state.round.before,
                key_id,
                now=int(fence.now.timestamp()),
                retain_seconds=int(retain),
            )
            if held is not None:
                log.warning("%s", held)
                return held
            once.delete_key(farm.dkm_group, key_id)
            self._state.round.shredding.add(key_id)  # the tombstone, in the record written
            fence.tx.mark_deleted(key_id)
            line = (
                f"master key {key_id} is deleted from the directory ({reason}): the"
                f" {use.archived} archived certificates sealed under it can never be"
                " opened again"
            )
            self._audit_key(fence, AuditAction.MASTER_KEY_DELETE, key_id, line)
        self._directory.forget(farm.dkm_group, key_id)
        self._step("deleted", key_id)
        return line

    def _repair_policy(
        self, farm: Farm, once: Directory, current: uuid.UUID, found: uuid.UUID
    ) -> Applied:
        """CryptoPolicy names another key than the farm's record: name the recorded one."""
        with self._state.fenced(farm) as fence:
            before = self._state.round.before
            if before is not None and before.master_key != current:
                # The table is a DB writer's to edit; the authenticated record is under the
                # key the leader last made current. The directory is left as it is.
                detail = (
                    f"the master_key table names {current} current, but the authenticated farm"
                    f" state is under {before.master_key}: CryptoPolicy ({found}) left"
                    " as it is"
                )
                log.warning("%s", detail)
                return Applied("policy", "master key", str(current), detail)
            once.set_current_key(farm.dkm_group, current)
            detail = f"CryptoPolicy named {found}, not the current key; corrected"
            self._audit_key(fence, AuditAction.MASTER_KEY_POLICY, current, detail)
        return Applied("policy", "master key", str(current), detail)

    def adopt(self, farm: Farm) -> uuid.UUID:
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
                    stage=MasterKeyStage.CURRENT if info.id == current else MasterKeyStage.PREVIOUS,
                    created_at=info.created_at,
                    reason="adopted from the directory",
                )
            detail = f"{len(infos)} keys recorded from the directory"
            self._audit_key(fence, AuditAction.MASTER_KEY_ADOPT, current, detail)
        return current

    def _audit_key(self, fence: Fence, action: AuditAction, key_id: uuid.UUID, detail: str) -> None:
        fence.tx.audit(
            node=self._election.node_id,
            term=fence.term,
            action=action,
            master_key=key_id,
            detail=detail,
        )
