"""Answering `farmkeys repair-state`: authenticate exactly the live rows the operator
reviewed as the farm state.

The request's MAC covers a digest of those rows; if they changed since, nothing is
written. Nothing revoked is ever dropped: the last record that still verifies keeps its
revoked list and tombstones, the operator's list adds to it, and when no record verifies
the operator must have named the revoked thumbprints. A live certificate in the revoked
list is archived again, never made live. The version is one above the last authentic
one, or the operator's floor (above what nodes installed after a restored backup), at
most :data:`farmkeys.formats.farm_state.MAX_VERSION_STEP` above it.
"""

from __future__ import annotations

from farmkeys.db import CHANGED_CHANNEL, CertificateRow, Farm
from farmkeys.election import Fence
from farmkeys.errors import DirectoryError, FarmStateError, RequestRefusedError
from farmkeys.formats import farm_state
from farmkeys.formats import request as request_format
from farmkeys.leader.certificates import CertificateRollover
from farmkeys.leader.keys import CurrentKey
from farmkeys.leader.state import Round, StateFence
from farmkeys.vocab import AuditAction, Role


def repair_state(
    fence: Fence,
    farm: Farm,
    request: request_format.Request,
    state: StateFence,
    key: CurrentKey,
    certificates: CertificateRollover,
) -> list[str]:
    """Carry out an authentic repair-state request in ``fence``; the answer's lines."""
    terms = request.repair
    assert terms is not None
    request_format.check_fresh(request, now=int(fence.now.timestamp()))
    previous, why = _last_authentic(fence, farm, key)
    if previous is not None and previous.has_answered(request.nonce):
        raise RequestRefusedError(
            f"request {request.id} (repair-state) was answered before: this is a copy of"
            " it put back in the queue",
            "nothing was done; someone who can write the config DB replayed it",
        )
    rows = fence.tx.live_certificates()
    version = _check_terms(terms, rows, previous, why)
    revoked = set(terms.revoked) | (set(previous.revoked) if previous is not None else set())
    shredded = state.shredded(fence, previous)
    lines = _archive_revoked(fence, rows, revoked, certificates)
    rows = fence.tx.live_certificates()
    if previous is None:
        lines.append(f"no farm state verified ({why}); the live rows are authenticated")
    else:
        lines.extend(
            f"differs from version {previous.version}: {line}"
            for line in previous.differences(rows)
        )
    state.round = Round(
        before=previous, answering=[farm_state.Answered(request.nonce, request.expires)]
    )
    written = state.write(
        fence,
        farm,
        previous,
        key=None,
        revoked=revoked,
        shredded=shredded,
        version=version,
        action=AuditAction.STATE_REPAIR,
    )
    state.round.answering = []
    assert written is not None
    fence.tx.notify(CHANGED_CHANNEL, f"term {fence.term}")
    live = ", ".join(e.describe() for e in written.live) or "none"
    lines.append(f"farm state version {written.version} written: {live}")
    return lines


def _last_authentic(
    fence: Fence, farm: Farm, key: CurrentKey
) -> tuple[farm_state.FarmState | None, str]:
    """The farm state record if it still verifies, else None and why not."""
    stored = fence.tx.stored_state()
    if stored is None:
        return None, "the config DB has no farm state record"
    try:
        return farm_state.verify(
            stored.body,
            stored.mac,
            farm=farm.dkm_group,
            key_for=lambda key_id: key.bytes_of(farm, key_id),
        ), ""
    except (FarmStateError, DirectoryError) as exc:
        return None, exc.what


def _check_terms(
    terms: request_format.RepairTerms,
    rows: list[CertificateRow],
    previous: farm_state.FarmState | None,
    why: str,
) -> int:
    """The version to write, once the request's terms hold for ``rows``; refused else."""
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
    return version


def _archive_revoked(
    fence: Fence,
    rows: list[CertificateRow],
    revoked: set[str],
    certificates: CertificateRollover,
) -> list[str]:
    """Archive again every live row whose thumbprint is revoked; a line for each."""
    lines = []
    for row in rows:
        if row.thumbprint in revoked:
            fence.tx.set_role(row.id, Role.ARCHIVED)
            detail = "urgently replaced before; archived again by repair-state"
            certificates.audit(fence, AuditAction.ARCHIVE, row, detail)
            lines.append(f"{row.purpose} {row.role} {row.thumbprint}: {detail}")
    return lines
