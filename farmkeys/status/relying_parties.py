"""The relying parties of ``[publish]`` as status shows them: what each fetched, and
which promotion of a signing secondary waits for whom."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from farmkeys import policy as rollover_policy
from farmkeys.config import Config, PolicyConfig, RelyingParty
from farmkeys.db import CertificateRow, ConfigDB, FetchRow
from farmkeys.status.document import RelyingPartyStatus, iso
from farmkeys.status.problems import Problems

Unfetched = dict[uuid.UUID, tuple[str, ...]]


def relying_parties(
    config: Config,
    db: ConfigDB,
    live: Sequence[CertificateRow],
    now: datetime,
    problems: Problems,
) -> tuple[tuple[RelyingPartyStatus, ...], Unfetched]:
    """Each relying party of ``[publish]``: its last fetch, and whether it has fetched the
    signing secondary; and which secondaries' promotions wait for whom."""
    parties = config.publish.parties
    if not parties:
        return (), {}
    fetches = db.fetches()
    fetched = {(f.relying_party, f.thumbprint) for f in fetches}
    secondary = _live(live, "secondary")
    live_signing = {r.thumbprint for r in live if r.purpose == "signing"}
    found = tuple(_party(party, fetches, fetched, secondary, live_signing) for party in parties)
    waiting = rollover_policy.unfetched_by([p.name for p in parties], fetched, live)
    policy = config.policy
    if secondary is not None and secondary.id in waiting and policy.require_fetch:
        _check_held(policy, now, live, secondary, waiting[secondary.id], problems)
    return found, (waiting if policy.require_fetch else {})


def _live(live: Sequence[CertificateRow], role: str) -> CertificateRow | None:
    return next((r for r in live if r.purpose == "signing" and r.role == role), None)


def _party(
    party: RelyingParty,
    fetches: Sequence[FetchRow],
    fetched: set[tuple[str, str]],
    secondary: CertificateRow | None,
    live_signing: set[str],
) -> RelyingPartyStatus:
    own = [f for f in fetches if f.relying_party == party.name]
    last = max(own, key=lambda f: f.last_fetched_at, default=None)
    return RelyingPartyStatus(
        name=party.name,
        url=party.url,
        last_fetch_at=last.last_fetched_at if last else None,
        last_node=last.node if last else None,
        fetched=tuple(sorted(f.thumbprint for f in own if f.thumbprint in live_signing)),
        has_secondary=None if secondary is None else (party.name, secondary.thumbprint) in fetched,
    )


def _check_held(
    policy: PolicyConfig,
    now: datetime,
    live: Sequence[CertificateRow],
    secondary: CertificateRow,
    waiting: Sequence[str],
    problems: Problems,
) -> None:
    """A warning once the secondary's promotion is due and waits for relying parties."""
    due = secondary.created_at + policy.units(policy.promotion_threshold)
    if now < due:
        return
    primary = _live(live, "primary")
    regardless = (
        ""
        if primary is None
        else f"; it is promoted regardless at"
        f" {iso(primary.not_after - policy.units(policy.critical_threshold))}"
    )
    problems.add(
        "warning",
        f"the promotion of signing secondary {secondary.thumbprint}, due since"
        f" {iso(due)}, waits for relying parties that have not fetched it:"
        f" {', '.join(waiting)}{regardless}",
    )
