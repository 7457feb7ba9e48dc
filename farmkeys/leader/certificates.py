"""Certificate rollover: carrying out what :mod:`farmkeys.policy` decides is due
(generate a secondary, promote it, retire and archive the replaced primary), and an
operator's rollover request, each step in a fenced transaction and in the audit log.

Every change of a primary is recorded in the farm state record the transaction writes
(:class:`farmkeys.formats.farm_state.Promotion`), so that `rollover --revert` undoes
exactly the last one; a revert puts a hold on the demoted primary's promotion into the
same record, which the check honours and a plain `rollover` releases."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from farmkeys import policy
from farmkeys.config import Config
from farmkeys.db import CHANGED_CHANNEL, CertificateRow, ConfigDB, Farm, FetchRow, NewCertificate
from farmkeys.election import Election, Fence
from farmkeys.errors import CertificateError, DirectoryError, RevertRefusedError
from farmkeys.formats import certificates, farm_state, fetch_record
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
    certificate: uuid.UUID | None = None

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
                    before = self._state.round.before
                    actions = policy.decide(
                        self._config.policy,
                        fence.now,
                        rows,
                        unfetched=unfetched,
                        held=frozenset() if before is None else before.held_secondaries(),
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
            retired = self.retire_primary(fence, rows, action.purpose, reason=action.reason)
            row = by_id[action.certificate_id]
            fence.tx.set_role(row.id, Role.PRIMARY)
            self.promoted(fence, action.purpose, row.id, retired)
            return self.audit(fence, AuditAction.PROMOTE, row, action.reason)
        if action.kind == "generate":
            return self.generate(fence, farm, action.purpose, Role.SECONDARY, action.reason)
        if action.kind == "generate_and_promote":
            retired = self.retire_primary(fence, rows, action.purpose, reason=action.reason)
            made = self.generate(fence, farm, action.purpose, Role.PRIMARY, action.reason)
            assert made.certificate is not None
            self.promoted(fence, action.purpose, made.certificate, retired)
            return made
        raise AssertionError(f"unknown action {action.kind}")

    def retire_primary(
        self, fence: Fence, rows: Sequence[CertificateRow], purpose: str, *, reason: str
    ) -> uuid.UUID | None:
        """The primary of ``purpose`` becomes retired: still installed and published; its
        id (None: there was none)."""
        for row in rows:
            if row.purpose == purpose and row.role == Role.PRIMARY:
                fence.tx.set_role(row.id, Role.RETIRED)
                self.audit(fence, AuditAction.RETIRE, row, f"replaced: {reason}")
                return row.id
        return None

    def promoted(
        self,
        fence: Fence,
        purpose: str,
        primary: uuid.UUID,
        previous: uuid.UUID | None,
        *,
        urgent: bool = False,
    ) -> None:
        """Record in the next farm state record that ``primary`` replaced ``previous``:
        what a revert may undo (after an urgent replacement: refuses to)."""
        at = int(fence.now.timestamp())
        self._state.round.promoting.append(
            farm_state.Promotion(purpose, at, primary, previous, urgent)
        )

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
        return Applied(action, purpose, thumbprint, detail, certificate)

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
            previous = next((r.id for r in mine if r.role == Role.PRIMARY), None)
            for row in mine:
                if row.role in (Role.PRIMARY, Role.SECONDARY):
                    fence.tx.set_role(row.id, Role.ARCHIVED)
                    self._state.round.revoking.add(row.thumbprint)  # no node installs it again
                    self.audit(fence, AuditAction.ARCHIVE, row, f"replaced: {reason}")
            made = self.generate(fence, farm, purpose, Role.PRIMARY, reason)
            assert made.certificate is not None
            self.promoted(fence, purpose, made.certificate, previous, urgent=True)
            archived = ", ".join(replaced) or "none"
            return f"{purpose}: new primary {made.thumbprint}; archived {archived}"
        secondary = next((r for r in mine if r.role == Role.SECONDARY), None)
        before = self._state.round.before
        hold = None if before is None else before.hold(purpose)
        if secondary is not None and hold is not None and hold.secondary == secondary.id:
            # The operator's word that the relying parties are ready: the schedule resumes.
            self._state.round.releasing.add(purpose)
            self.audit(
                fence,
                AuditAction.RELEASE,
                secondary,
                f"promotion released by the operator (held since the revert of {_at(hold.since)})",
            )
            return (
                f"{purpose}: promotion of secondary {secondary.thumbprint} released (held since"
                f" the revert of {_at(hold.since)}); the rollover check promotes it on its schedule"
            )
        if secondary is not None:
            return f"{purpose}: already has secondary {secondary.thumbprint}; nothing done"
        made = self.generate(fence, farm, purpose, Role.SECONDARY, reason)
        return f"{purpose}: new secondary {made.thumbprint}"

    def revert(self, fence: Fence, rows: Sequence[CertificateRow], purpose: str) -> str:
        """`rollover --revert`: undo ``purpose``'s last promotion as the authenticated farm
        state record tells it, and hold the demoted primary's promotion; the answer's line.
        :class:`RevertRefusedError` (nothing changed) when :func:`policy.revert` refuses."""
        before = self._state.round.before
        mine = [certified(r) for r in rows if r.purpose == purpose]
        hold = None if before is None else before.hold(purpose)
        plan = policy.revert(
            self._config.policy,
            fence.now,
            mine,
            purpose,
            promotion=None if before is None else before.promotion(purpose),
            revoked=() if before is None else before.revoked,
            held_since=None if hold is None else hold.since,
        )
        back, demoted = plan.primary, plan.secondary
        by_id = {r.id: r for r in rows}
        reason = "requested by the operator (revert)"
        fence.tx.set_role(demoted.id, Role.SECONDARY)
        fence.tx.set_role(back.id, Role.PRIMARY)
        self._state.round.reverting.add(purpose)
        since = int(fence.now.timestamp())
        self._state.round.holding.append(farm_state.Hold(purpose, demoted.id, since))
        self.audit(
            fence,
            AuditAction.REVERT,
            by_id[back.id],
            f"primary again, replacing {demoted.thumbprint}: {reason}",
        )
        self.audit(
            fence,
            AuditAction.REVERT,
            by_id[demoted.id],
            f"secondary again, its promotion held until `farmkeys rollover` or the critical"
            f" threshold: {reason}",
        )
        return (
            f"{purpose}: primary {back.thumbprint} (reverted), secondary {demoted.thumbprint}"
            " (promotion held until `farmkeys rollover` or the critical threshold)"
        )


def _at(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def certified(row: CertificateRow) -> CertificateRow:
    """``row`` with the dates its certificate itself carries, when its DER is the one the
    thumbprint names (the farm state record authenticates the thumbprint, not the date
    columns): a DB writer who moves ``not_after`` cannot make an expired one revertible.
    A DER that does not match is refused."""
    try:
        cert = certificates.load_certificate_der(row.der)
    except CertificateError:
        cert = None
    if cert is None or certificates.thumbprint(cert) != row.thumbprint:
        raise RevertRefusedError(
            f"{row.purpose}: the {row.role} {row.thumbprint}'s certificate in the config DB is"
            " not the one its thumbprint names",
            "someone who can write the config DB changed it; nothing was changed",
        )
    return replace(row, not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc)
