"""Answering the operators' requests: authenticate each, carry it out, record the answer.

A row of ``rollover_request`` is a letter box anyone who writes the config DB can fill.
The leader acts only on a request's signed body (:mod:`farmkeys.formats.request`), after
checking its MAC, that the row's columns say the same, that it has not expired, and that
the authentic farm state does not list its nonce as answered; the nonce goes into the
record written with the answer. Every audit event written while a request is carried out
records the request and who asked, as its verified body says
(:func:`farmkeys.db.attributed_to`). Any other row is answered "refused", audited as
``request_refused`` with the requester the row claims (in the event's detail, marked
claimed: never in its requester columns), and nothing else is done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from farmkeys.config import Config
from farmkeys.db import CHANGED_CHANNEL, Attribution, ConfigDB, Farm, RequestRow, attributed_to
from farmkeys.directory import Directory
from farmkeys.election import Election, Fence
from farmkeys.errors import (
    CertificateError,
    FarmStateError,
    InvalidBlobError,
    MasterKeyMissingError,
    RequestRefusedError,
    RevertRefusedError,
)
from farmkeys.formats import blob as blob_format
from farmkeys.formats import certificates, farm_state
from farmkeys.formats import request as request_format
from farmkeys.formats.blob import blob_context
from farmkeys.leader.certificates import CertificateRollover
from farmkeys.leader.keys import CurrentKey
from farmkeys.leader.master_keys import MasterKeyLifecycle
from farmkeys.leader.repair import repair_state
from farmkeys.leader.sealing import NeedKey, Spares, sealed_certificate
from farmkeys.leader.state import StateFence
from farmkeys.vocab import ALL_PURPOSES, PURPOSES, AuditAction, Role

log = logging.getLogger(__name__)


def _asked_by(request_id: int, request: request_format.Request) -> Attribution:
    """Who asked for an authenticated request, from its verified body alone."""
    who = request.requester
    if who is None:  # format 1: an older farmkeys did not say
        return Attribution(request_id, None, None, None)
    return Attribution(request_id, who.account, who.host, who.reason)


def _claimed(row: RequestRow) -> str:
    """The requester a refused row's columns claim, said as a claim."""
    claims = [f"claimed requester {row.requested_by!r}"]
    claims += [
        f"{name} {value!r}"
        for name, value in (("account", row.account), ("host", row.host))
        if value is not None
    ]
    return ", claimed ".join(claims)


class RequestAnswering:
    """The leader's side of the request queue."""

    def __init__(
        self,
        config: Config,
        db: ConfigDB,
        directory: Directory,
        election: Election,
        parts: tuple[StateFence, CurrentKey, Spares, CertificateRollover, MasterKeyLifecycle],
        *,
        refresh_key: Callable[[Farm], None],
    ) -> None:
        """``refresh_key(farm)`` reads the current master key (before a roll needs it)."""
        self._config = config
        self._db = db
        self._directory = directory
        self._election = election
        self._state, self._key, self._spares, self._certificates, self._master_keys = parts
        self._refresh_key = refresh_key

    def answer(self, farm: Farm) -> int:
        """Carry out every pending request that is authentic, refuse the rest; how many
        were answered."""
        answered = 0
        while True:
            row = self._db.next_request()
            if row is None:
                return answered
            try:
                request = self._authenticate(farm, row)
                with attributed_to(_asked_by(row.id, request)):
                    lines = self._answer_one(farm, row, request)
                    if lines is None:
                        continue  # another process took the row meanwhile
                    if request.kind == "master_key":
                        # A master-key roll spans several fenced steps: answered after the last.
                        if self._key.known is None:
                            self._refresh_key(farm)
                        lines = self._master_keys.roll(farm, urgent=request.urgent, request=row.id)
                        with self._state.fenced(farm) as fence:
                            self._answered(fence, row.id, lines, signed=request)
            except NeedKey as need:
                self._spares.make(need.purpose)
                continue
            except RequestRefusedError as exc:
                self._refuse(row, exc)
                answered += 1
                continue
            except FarmStateError as exc:
                # No change can be built on rows that fail their farm state: the request is
                # answered with why, so the operator learns it at once.
                if row.repair_state:
                    raise
                with self._election.fenced(self._db) as fence:
                    self._answered(fence, row.id, [f"refused: {exc.what}"], ok=False)
                answered += 1
                continue
            answered += 1
            log.info("request %d answered: %s", row.id, "; ".join(lines))
            if request.requester is None:
                log.warning(
                    "request %d (%s) was filed by a farmkeys before request format 2: carried"
                    " out, with who asked not recorded; upgrade farmkeys on node %s",
                    row.id,
                    request.describe(),
                    request.requested_by,
                )

    def _authenticate(self, farm: Farm, row: RequestRow) -> request_format.Request:
        """The request a row carries, once its MAC verifies and its columns agree with it
        (read outside any transaction: the key may come from the directory);
        :class:`RequestRefusedError` otherwise. Freshness and replay are judged in the
        fenced transaction that carries it out (:meth:`_admit`)."""
        request = request_format.verify(
            row.body,
            row.mac,
            farm=farm.dkm_group,
            row_id=row.id,
            key_for=lambda key_id: self._key.bytes_of(farm, key_id),
        )
        if request_format.columns_differ(request, row):
            raise RequestRefusedError(
                f"request {row.id}'s columns do not say what its signed body says"
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
        before = self._state.round.before
        if before is not None and before.has_answered(request.nonce):
            raise RequestRefusedError(
                f"request {request.id} ({request.describe()}) was answered before: this is"
                " a copy of it put back in the queue",
                "nothing was done; someone who can write the config DB replayed it",
            )

    @staticmethod
    def _same_row(fence: Fence, row: RequestRow) -> bool:
        """The row is still pending exactly as it was authenticated, and now locked for this
        transaction (False: another process answered it, or it was changed meanwhile, and
        is authenticated again on the next round)."""
        return fence.tx.lock_pending_request(row.id) == row

    def _answer_one(
        self, farm: Farm, row: RequestRow, request: request_format.Request
    ) -> list[str] | None:
        """Carry out one authentic request in one fenced transaction (a master-key roll:
        only admit it; its steps follow); the answer's lines, None if the row was gone."""
        if request.kind == "repair_state":
            with self._election.fenced(self._db) as fence:
                if not self._same_row(fence, row):
                    return None
                lines = repair_state(
                    fence, farm, request, self._state, self._key, self._certificates
                )
                self._answered(fence, row.id, lines)
                return lines
        with self._state.fenced(farm) as fence:
            if not self._same_row(fence, row):
                return None
            self._admit(fence, request)
            if request.kind == "master_key":
                return []
            if request.kind == "import":
                ok, line = self._import(fence, farm, row, request)
                self._answered(fence, row.id, [line], ok=ok, signed=request)
                return [line]
            assert request.purpose is not None
            if request.kind == "revert":
                ok, line = self._revert(fence, request.purpose)
                self._answered(fence, row.id, [line], ok=ok, signed=request)
                return [line]
            purposes = PURPOSES if request.purpose == ALL_PURPOSES else (request.purpose,)
            rows = fence.tx.live_certificates()
            lines = [
                self._certificates.requested(fence, farm, rows, purpose, urgent=request.urgent)
                for purpose in purposes
            ]
            self._answered(fence, row.id, lines, signed=request)
            return lines

    def _revert(self, fence: Fence, purpose: str) -> tuple[bool, str]:
        """Carry out a `rollover --revert` request: (done, the answer's line). A refusal
        (:func:`farmkeys.policy.revert` says why) changes nothing but the answer, whose
        line is ``revert refused: <what> — <what to do>``."""
        try:
            return True, self._certificates.revert(fence, fence.tx.live_certificates(), purpose)
        except RevertRefusedError as exc:
            return False, f"revert refused: {exc.diagnostics()}"

    def _refuse(self, row: RequestRow, exc: RequestRefusedError) -> None:
        """Answer a request the leader will not act on, and audit why."""
        log.warning("request %d refused: %s", row.id, exc.what)
        with self._election.fenced(self._db) as fence:
            fence.tx.audit(
                node=self._election.node_id,
                term=fence.term,
                action=AuditAction.REQUEST_REFUSED,
                detail=f"request {row.id} ({_claimed(row)}): {exc.what}",
            )
            self._answered(fence, row.id, [f"refused: {exc.what}"], ok=False)

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
        the transaction writes (a :meth:`StateFence.fenced` one), so a copy is refused."""
        if signed is not None:
            self._state.round.answering.append(farm_state.Answered(signed.nonce, signed.expires))
        fence.tx.answer_request(
            request_id, node=self._election.node_id, term=fence.term, ok=ok, result="\n".join(lines)
        )
        fence.tx.notify(CHANGED_CHANNEL, f"term {fence.term}")

    def _import(
        self, fence: Fence, farm: Farm, row: RequestRow, request: request_format.Request
    ) -> tuple[bool, str]:
        """Carry out a `farmkeys import adfs` request: (done, the answer's line).

        The certificate arrives sealed under a master key of this farm and bound to the id
        its row gets; it is opened, checked again (another import may have brought it
        meanwhile), sealed under the current key and inserted. A refusal changes nothing
        but the request's answer. Everything but the blob comes from the signed request;
        the blob is the one its digest names.
        """
        terms = request.import_
        assert terms is not None
        assert request.purpose is not None
        purpose, role, cert_id = request.purpose, terms.role, terms.certificate
        assert row.import_blob is not None  # the signed body names an import: checked
        blob = row.import_blob
        context = blob_context(farm.dkm_group, cert_id, purpose)
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
        conflict = fence.tx.import_conflict(
            thumbprint=thumb, purpose=purpose, role=role, certificate_id=cert_id
        )
        if conflict is not None:
            return False, f"import refused: {conflict}"
        key_id, key = self._key.current()  # raising rolls the transaction back
        reason = f"imported from {terms.source}"
        retired = None
        if role == Role.PRIMARY:
            rows = fence.tx.live_certificates()
            retired = self._certificates.retire_primary(fence, rows, purpose, reason=reason)
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
        if role == Role.PRIMARY:
            self._certificates.promoted(fence, purpose, made.id, retired)
        self._certificates.audit(fence, AuditAction.IMPORT, made, reason)
        return True, f"{purpose}: imported {thumb} as the {role}"
