"""Certificate rollover: carrying out what :mod:`farmkeys.policy` decides is due
(generate a secondary, promote it, retire and archive the replaced primary), and an
operator's rollover request, each step in a fenced transaction and in the audit log."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from farmkeys import policy
from farmkeys.config import Config
from farmkeys.db import CHANGED_CHANNEL, CertificateRow, ConfigDB, Farm, FetchRow, NewCertificate
from farmkeys.election import Election, Fence
from farmkeys.errors import DirectoryError
from farmkeys.formats import fetch_record
from farmkeys.leader.keys import CurrentKey
from farmkeys.leader.sealing import NeedKey, Spares, sealed_certificate
from farmkeys.leader.state import StateFence
from farmkeys.vocab import AuditAction, Purpose, Role

log = logging.getLogger(__name__)

# decide() converges in a few rounds (archive, then promote, then generate);
# a bound keeps a bug from looping inside one check.
MAX_ROUNDS = 6


@dataclass(frozen=True)
class Applied:
    """One step the leader carried out."""

    action: str
    purpose: str
    thumbprint: str
    detail: str

    def __str__(self) -> str:
        return f"{self.action} {self.purpose} {self.thumbprint}: {self.detail}"


class CertificateRollover:
    """The certificate steps of the leader."""

    def __init__(
        self,
        config: Config,
        db: ConfigDB,
        election: Election,
        state: StateFence,
        key: CurrentKey,
        spares: Spares,
    ) -> None:
        self._config = config
        self._db = db
        self._election = election
        self._state = state
        self._key = key
        self._spares = spares

    def check(self, farm: Farm) -> list[Applied]:
        """Run the rollover check: apply what the policy says is due, until nothing is."""
        done: list[Applied] = []
        for _ in range(MAX_ROUNDS):
            # What is likely due, decided outside the fence, so its keys are made before.
            live = self._db.certificates(include_archived=False)
            unfetched = self._unfetched(farm, self._db.fetches, live)
            self._spares.make_for(
                policy.decide(self._config.policy, self._db.now(), live, unfetched=unfetched)
            )
            try:
                with self._state.fenced(farm) as fence:
                    rows = fence.tx.live_certificates()
                    unfetched = self._unfetched(farm, fence.tx.fetches, rows)
                    actions = policy.decide(
                        self._config.policy, fence.now, rows, unfetched=unfetched
                    )
                    if not actions:
                        break
                    steps = [self._apply(fence, farm, rows, action) for action in actions]
                    fence.tx.notify(CHANGED_CHANNEL, f"term {fence.term}")
            except NeedKey as need:
                self._spares.make(need.purpose)
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
        self, farm: Farm, fetches: Callable[[], Sequence[FetchRow]], rows: Sequence[CertificateRow]
    ) -> dict[uuid.UUID, tuple[str, ...]]:
        """With policy.require_fetch: the relying parties that have not fetched each signing
        secondary (read only then, and only when there is a secondary)."""
        parties = [p.name for p in self._config.publish.parties]
        has_secondary = any(r.purpose == Purpose.SIGNING and r.role == Role.SECONDARY for r in rows)
        if not (self._config.policy.require_fetch and parties and has_secondary):
            return {}
        fetched = {(f.relying_party, f.thumbprint) for f in fetches() if self._authentic(farm, f)}
        return policy.unfetched_by(parties, fetched, rows)

    def _authentic(self, farm: Farm, fetch: FetchRow) -> bool:
        """Whether a fetch record carries a valid MAC of the node that served it: a forged
        row must not release a promotion held for that relying party. The key is one the
        leader has read (cached by the directory client), so this costs no request."""
        if fetch.mac is None or fetch.mac_key is None:
            return False
        try:
            key = fetch_record.mac_key(self._key.bytes_of(farm, fetch.mac_key), farm.dkm_group)
        except DirectoryError:
            return False
        return fetch_record.verify(
            key,
            fetch.mac,
            farm=farm.dkm_group,
            relying_party=fetch.relying_party,
            thumbprint=fetch.thumbprint,
        )

    def _apply(
        self, fence: Fence, farm: Farm, rows: Sequence[CertificateRow], action: policy.Action
    ) -> Applied:
        by_id = {r.id: r for r in rows}
        if action.kind == "archive":
            assert action.certificate_id is not None
            row = by_id[action.certificate_id]
            fence.tx.set_role(row.id, Role.ARCHIVED)
            return self.audit(fence, AuditAction.ARCHIVE, row, action.reason)
        if action.kind == "promote":
            assert action.certificate_id is not None
            self.retire_primary(fence, rows, action.purpose, reason=action.reason)
            row = by_id[action.certificate_id]
            fence.tx.set_role(row.id, Role.PRIMARY)
            return self.audit(fence, AuditAction.PROMOTE, row, action.reason)
        if action.kind == "generate":
            return self.generate(fence, farm, action.purpose, Role.SECONDARY, action.reason)
        if action.kind == "generate_and_promote":
            self.retire_primary(fence, rows, action.purpose, reason=action.reason)
            return self.generate(fence, farm, action.purpose, Role.PRIMARY, action.reason)
        raise AssertionError(f"unknown action {action.kind}")

    def retire_primary(
        self, fence: Fence, rows: Sequence[CertificateRow], purpose: str, *, reason: str
    ) -> None:
        """The primary of ``purpose`` becomes retired: still installed and published."""
        for row in rows:
            if row.purpose == purpose and row.role == Role.PRIMARY:
                fence.tx.set_role(row.id, Role.RETIRED)
                self.audit(fence, AuditAction.RETIRE, row, f"replaced: {reason}")

    def generate(self, fence: Fence, farm: Farm, purpose: str, role: Role, reason: str) -> Applied:
        key_id, key = self._key.current()  # raising rolls the transaction back
        row = sealed_certificate(
            self._config,
            dkm_group=farm.dkm_group,
            certificate_id=uuid.uuid4(),
            purpose=purpose,
            role=role,
            generated=self._spares.take(purpose, fence.now),
            master_key_id=key_id,
            master_key=key,
        )
        fence.tx.insert_certificate(row)
        action = (
            AuditAction.GENERATE if role == Role.SECONDARY else AuditAction.GENERATE_AND_PROMOTE
        )
        return self._record(fence, action, purpose, row.id, row.thumbprint, reason)

    def audit(self, fence: Fence, action: AuditAction, row: NewCertificate, detail: str) -> Applied:
        """Record a step done to ``row`` (its purpose and thumbprint) in the audit log."""
        return self._record(fence, action, row.purpose, row.id, row.thumbprint, detail)

    def _record(
        self,
        fence: Fence,
        action: AuditAction,
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

    def requested(
        self,
        fence: Fence,
        farm: Farm,
        rows: Sequence[CertificateRow],
        purpose: str,
        *,
        urgent: bool,
    ) -> str:
        """An operator's rollover of ``purpose`` (AD FS's Update-AdfsCertificate); the
        answer's line."""
        mine = [r for r in rows if r.purpose == purpose]
        reason = "requested by the operator" + (" (urgent)" if urgent else "")
        if urgent:
            # AD FS's -Urgent: the replaced primary, and any secondary made before it,
            # are archived at once, not kept installed.
            replaced = [r.thumbprint for r in mine if r.role in (Role.PRIMARY, Role.SECONDARY)]
            for row in mine:
                if row.role in (Role.PRIMARY, Role.SECONDARY):
                    fence.tx.set_role(row.id, Role.ARCHIVED)
                    self._state.round.revoking.add(row.thumbprint)  # no node installs it again
                    self.audit(fence, AuditAction.ARCHIVE, row, f"replaced: {reason}")
            made = self.generate(fence, farm, purpose, Role.PRIMARY, reason)
            archived = ", ".join(replaced) or "none"
            return f"{purpose}: new primary {made.thumbprint}; archived {archived}"
        secondary = next((r for r in mine if r.role == Role.SECONDARY), None)
        if secondary is not None:
            return f"{purpose}: already has secondary {secondary.thumbprint}; nothing done"
        made = self.generate(fence, farm, purpose, Role.SECONDARY, reason)
        return f"{purpose}: new secondary {made.thumbprint}"
