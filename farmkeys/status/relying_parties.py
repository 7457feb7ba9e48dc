"""The relying parties of ``[publish]`` as status shows them: what each fetched, and
which promotion of a signing secondary waits for whom."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime

from farmkeys import policy as rollover_policy
from farmkeys.config import Config, PolicyConfig, RelyingParty
from farmkeys.db import CertificateRow, ConfigDB, FetchRow
from farmkeys.db.rows import Farm
from farmkeys.directory import Directory
from farmkeys.errors import DirectoryError
from farmkeys.formats import fetch_record
from farmkeys.status.document import RelyingPartyStatus, iso
from farmkeys.status.problems import Problems

Unfetched = dict[uuid.UUID, tuple[str, ...]]


def relying_parties(
    config: Config,
    db: ConfigDB,
    live: Sequence[CertificateRow],
    now: datetime,
    problems: Problems,
    *,
    authentic: Callable[[FetchRow], bool] | None = None,
) -> tuple[tuple[RelyingPartyStatus, ...], Unfetched]:
    """Each relying party of ``[publish]``: its last fetch, and whether it has fetched the
    signing secondary; which secondaries' promotions wait for whom; and a warning for
    each that has not fetched the signing primary (after an urgent rollover: until each
    has the new key).

    ``authentic`` tells a fetch record that carries its serving node's MAC from a forged
    one (the config DB is attacker-writable); without it (no directory), every row counts.
    """
    parties = config.publish.parties
    if not parties:
        return (), {}
    fetches = [f for f in db.fetches() if authentic is None or authentic(f)]
    fetched = {(f.relying_party, f.thumbprint) for f in fetches}
    primary = _live(live, "primary")
    if primary is not None:
        lacking = [p.name for p in parties if (p.name, primary.thumbprint) not in fetched]
        if lacking:
            problems.add(
                "warning",
                f"relying parties {', '.join(lacking)} have not fetched the signing primary"
                f" {primary.thumbprint} (since {iso(primary.created_at)}): they reject the"
                " tokens it signs until they fetch the metadata",
            )
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


def fetch_authenticator(
    directory: Directory | None, farm: Farm
) -> Callable[[FetchRow], bool] | None:
    """Whether a fetch record carries a valid MAC of the node that served it, checked with
    the master key it names (read once each). None without a directory; a record whose
    key cannot be read now (the directory away, a problem status reports anyway) counts
    as it did before fetch MACs: status shows, it decides nothing. A record with no MAC,
    or one that does not verify, is a forgery and never counts."""
    if directory is None:
        return None
    keys: dict[uuid.UUID, bytes | None] = {}

    def authentic(fetch: FetchRow) -> bool:
        if fetch.mac is None or fetch.mac_key is None:
            return False
        if fetch.mac_key not in keys:
            try:
                master = directory.master_key(farm.dkm_group, fetch.mac_key)
                keys[fetch.mac_key] = fetch_record.mac_key(master, farm.dkm_group)
            except DirectoryError:
                keys[fetch.mac_key] = None
        key = keys[fetch.mac_key]
        return key is None or fetch_record.verify(
            key,
            fetch.mac,
            farm=farm.dkm_group,
            relying_party=fetch.relying_party,
            thumbprint=fetch.thumbprint,
        )

    return authentic
