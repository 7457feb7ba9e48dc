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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from farmkeys import certs, dkm, policy
from farmkeys.config import Config, RetryConfig
from farmkeys.configdb import CHANGED_CHANNEL, CertificateRow, ConfigDB, Farm, NewCertificate
from farmkeys.directory import Directory
from farmkeys.election import Election, Fence, read_lease
from farmkeys.errors import DirectoryError, Error, LeaderTimeoutError
from farmkeys.sync import blob_context

log = logging.getLogger(__name__)

# decide() converges in a few rounds (archive, then promote, then generate);
# a bound keeps a bug from looping inside one check.
MAX_ROUNDS = 6
# How the leader re-reads a master key it already holds: once, no retries.
_ONE_ATTEMPT = RetryConfig(total_seconds=0.0)


@dataclass(frozen=True)
class Applied:
    """One step the leader carried out."""

    action: str
    purpose: str
    thumbprint: str
    detail: str

    def __str__(self) -> str:
        return f"{self.action} {self.purpose} {self.thumbprint}: {self.detail}"


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
    not_before = now.replace(microsecond=0)
    generated = certs.generate(
        farm_name=config.farm.name,
        purpose=purpose,
        key_type=config.policy.key,
        not_before=not_before,
        not_after=not_before + config.policy.units(config.policy.certificate_duration),
    )
    cert = generated.certificate
    cert_id = uuid.uuid4()
    thumb = certs.thumbprint(cert)
    pkcs12 = certs.to_pkcs12(
        cert, generated.key, friendly_name=f"{config.farm.name} token {purpose} {thumb}"
    )
    blob = dkm.seal(
        pkcs12,
        master_key=master_key,
        master_key_id=master_key_id,
        context=blob_context(dkm_group, cert_id, purpose),
    )
    return NewCertificate(
        id=cert_id,
        purpose=purpose,
        role=role,
        thumbprint=thumb,
        sha256=certs.sha256_fingerprint(cert),
        subject=cert.subject.rfc4514_string(),
        key_type=config.policy.key,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        der=certs.certificate_der(cert),
        master_key=master_key_id,
        blob=blob,
    )


class Leader:
    """The writes a lease holder makes, each in a fenced transaction."""

    def __init__(
        self, config: Config, db: ConfigDB, directory: Directory, election: Election
    ) -> None:
        self._config = config
        self._db = db
        self._directory = directory
        self._election = election
        self._key: tuple[uuid.UUID, bytes] | None = None  # the current master key, in memory
        self._key_error: DirectoryError | None = None

    def _refresh_key(self, farm: Farm) -> None:
        """Read the current master key before any transaction opens.

        Directory I/O never happens while the lease row is locked: a slow or
        unreachable directory must not hold up lease renewals. If the directory
        cannot be read, the last key read stays in use (it is still valid; a
        new blob sealed under it opens as well as any other).

        Once a key is known, the directory gets one attempt, on a connection
        of its own: an outage must not hold up a promotion or an archive (which
        need no key) for the retry budget, nor the node's syncs, which share
        the patient connection and its lock.
        """
        try:
            if self._key is None:
                key_id = self._directory.current_key_id(farm.dkm_group)
            else:
                with Directory(self._config.directory, _ONE_ATTEMPT) as once:
                    key_id = once.current_key_id(farm.dkm_group)
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

    def tick(self) -> list[Applied]:
        """What `serve` runs on schedule: answer pending requests, then the rollover check,
        with one read of the master key for both."""
        farm = self._farm_and_key()
        self.answer_requests(farm=farm)
        return self.check(farm=farm)

    def _farm_and_key(self) -> Farm:
        """The farm, with the current master key read (outside any transaction)."""
        farm = self._db.require_farm()
        self._refresh_key(farm)
        return farm

    def check(self, *, farm: Farm | None = None) -> list[Applied]:
        """Run the rollover check: apply what the policy says is due, until nothing is.

        ``farm``: given by :meth:`tick`, which has just read the master key.
        """
        if farm is None:
            farm = self._farm_and_key()
        done: list[Applied] = []
        for _ in range(MAX_ROUNDS):
            with self._election.fenced(self._db) as fence:
                rows = fence.tx.live_certificates()
                actions = policy.decide(self._config.policy, fence.now, rows)
                if not actions:
                    break
                for action in actions:
                    done.append(self._apply(fence, farm, rows, action))
                fence.tx.notify(CHANGED_CHANNEL, f"term {fence.term}")
        for step in done:
            log.info("rollover: %s", step)
        return done

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
        if self._key is None:
            # Raising rolls the whole transaction back: nothing half-done.
            raise self._key_error or DirectoryError(
                "the current master key has not been read", "check the directory"
            )
        key_id, key = self._key
        row = new_certificate(
            self._config,
            dkm_group=farm.dkm_group,
            purpose=purpose,
            role=role,
            master_key_id=key_id,
            master_key=key,
            now=fence.now,
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

    # -- operator requests -------------------------------------------------------------

    def answer_requests(self, *, farm: Farm | None = None) -> int:
        """Carry out every pending `farmkeys rollover` request; how many were answered.

        ``farm``: given by :meth:`tick`, which has just read the master key.
        """
        if farm is None:
            farm = self._farm_and_key()
        answered = 0
        while True:
            with self._election.fenced(self._db) as fence:
                pending = fence.tx.execute(
                    "SELECT id, purpose, urgent FROM rollover_request WHERE done_at IS NULL"
                    " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
                )
                if not pending:
                    return answered
                request = pending[0]
                purposes = certs.PURPOSES if request["purpose"] == "all" else (request["purpose"],)
                rows = fence.tx.live_certificates()
                lines = [
                    self._requested(fence, farm, rows, purpose, urgent=request["urgent"])
                    for purpose in purposes
                ]
                fence.tx.execute(
                    "UPDATE rollover_request SET done_at = now(), done_by = %s, term = %s,"
                    " ok = true, result = %s WHERE id = %s",
                    (self._election.node_id, fence.term, "\n".join(lines), request["id"]),
                )
                fence.tx.notify(CHANGED_CHANNEL, f"term {fence.term}")
                answered += 1
            log.info("rollover request %d answered: %s", request["id"], "; ".join(lines))

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
    purpose: str,
    urgent: bool,
    timeout_seconds: float,
) -> RolloverOutcome:
    """Ask the leader for a rollover and wait for its answer.

    When no process holds the lease, take it for the operation, answer the
    request under the fence, and give the lease back. Either way exactly one
    writer acts. A request nobody answered in time is withdrawn, so it cannot
    surprise anyone later.
    """
    db.require_farm()
    request = db.request_rollover(node_id=config.node.id, purpose=purpose, urgent=urgent)
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
                log.info("no node leads; %s took the lease for this rollover", config.node.id)
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
                    f"the leader ({lease.holder_node or 'none'}) did not answer rollover"
                    f" request {request} within {timeout_seconds:.0f} s; it was withdrawn",
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
