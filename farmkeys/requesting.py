"""The operator's side of a request to the leader: sign and file it, then await the answer.

`farmkeys rollover`, `farmkeys repair-state` and `farmkeys import adfs` ask the
leader for a change through the config DB's request table. The request is
signed under the farm's current master key (:mod:`farmkeys.formats.request` is the
codec; the leader authenticates it before doing anything), and the command
waits for the leader's answer. When no process leads, the command takes the
lease itself and answers its own request under the fence, with the leader's
code: that is why this module sits above :mod:`farmkeys.leader` and below
the CLI and :mod:`farmkeys.adfs_import`, its two callers.

Every request names who asks (:func:`requester`): the account the command runs as
(with sudo's ``SUDO_USER``), the host it runs on, and the operator's ``--reason``.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime

from farmkeys import policy
from farmkeys.config import Config
from farmkeys.db import ConfigDB
from farmkeys.directory import Directory
from farmkeys.election import Election, read_lease
from farmkeys.errors import Error, FarmStateError, LeaderTimeoutError, RequestRefusedError
from farmkeys.formats import farm_state
from farmkeys.formats import request as request_format
from farmkeys.leader import Leader
from farmkeys.leader.certificates import certified
from farmkeys.operator import requester

log = logging.getLogger(__name__)


def preview_revert(
    config: Config, db: ConfigDB, directory: Directory, purpose: str
) -> policy.Revert:
    """What `rollover --revert` of ``purpose`` would do now, by the same rule the leader
    applies (:func:`farmkeys.policy.revert`) to the farm state record, verified here under
    its master key: the command shows the operator the thumbprints, or refuses in one line
    (:class:`farmkeys.errors.RevertRefusedError`) before anything is asked. The leader
    decides again in its fenced transaction; this only lets nothing be filed in vain."""
    farm = db.require_farm()
    stored = db.stored_state()
    if stored is None:
        raise FarmStateError(
            "the config DB has no farm state record, so no promotion is recorded to revert",
            farm_state.REPAIR,
        )
    state = farm_state.verify(
        stored.body,
        stored.mac,
        farm=farm.dkm_group,
        key_for=lambda key_id: directory.master_key(farm.dkm_group, key_id),
    )
    live = db.certificates(include_archived=False)
    error = farm_state.mismatch(state, live)
    if error is not None:
        raise error
    hold = state.hold(purpose)
    return policy.revert(
        config.policy,
        db.now(),
        [certified(r) for r in live if r.purpose == purpose],
        purpose,
        promotion=state.promotion(purpose),
        revoked=state.revoked,
        held_since=None if hold is None else hold.since,
    )


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
    reason: str | None = None,
    revert: bool = False,
) -> RolloverOutcome:
    """Ask the leader for a rollover and wait for its answer.

    ``purpose`` None asks for a master-key rollover (`--master-key`);
    ``repair`` for `farmkeys repair-state` instead, vouching for those terms;
    ``revert`` to undo the last promotion of ``purpose`` (`--revert`).
    ``reason``: the operator's `--reason`, signed with the request and audited.

    When no process holds the lease, take it for the operation, answer the
    request under the fence, and give the lease back. Either way exactly one
    writer acts. A request nobody answered in time is withdrawn, so it cannot
    surprise anyone later.
    """
    kind = (
        "repair_state"
        if repair is not None
        else "revert"
        if revert
        else "master_key"
        if purpose is None
        else "rollover"
    )
    request = file_request(
        config,
        db,
        directory,
        kind=kind,
        purpose="all" if repair is not None else purpose,
        urgent=urgent,
        lifetime_seconds=timeout_seconds,
        repair=repair,
        reason=reason,
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
    reason: str | None = None,
) -> int:
    """Sign a request under the farm's current master key (the one the directory's
    CryptoPolicy names, not the config DB's word) and queue it; its id.

    The request names who asks (:func:`requester`, with ``reason``); one that cannot
    is refused before anything is read.

    It stays valid for ``lifetime_seconds`` and a minute more (at most
    :data:`farmkeys.formats.request.MAX_LIFETIME_SECONDS`), by the config DB's clock.
    """
    who = requester(reason)
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
            requester=who,
        )
        return request_format.sign(request, key)

    terms = None if import_ is None else import_[0]
    return db.file_request(
        node_id=config.node.id,
        purpose=purpose,
        urgent=urgent,
        master_key=kind == "master_key",
        repair_state=kind == "repair_state",
        revert=kind == "revert",
        import_=None
        if import_ is None or terms is None
        else (terms.certificate, import_[1], terms.role, terms.source),
        requester=(who.account, who.host, who.reason),
        sign=sign,
    )


# What a leader of request format 1 answers a format-2 body: its field list has no account.
_OLD_FIELDS_REFUSAL = "the request is malformed: the request does not have exactly the fields"
# What a leader from before `rollover --revert` answers a revert: it knows no such kind.
_OLD_KIND_REFUSAL = "the request is malformed: its kind is unknown"


def _refused_by_an_older_leader(result: str) -> bool:
    """Whether an answer is an older leader's refusal of what this command signed: a
    format-1 leader's of a format-2 body (a newer leader names the requester's fields in
    the same refusal), or a leader's from before a kind this command files (a revert)."""
    return (_OLD_FIELDS_REFUSAL in result and "'account'" not in result) or (
        _OLD_KIND_REFUSAL in result
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
        answer = db.request_answer(request)
        if answer.done_at is not None:
            outcome = RolloverOutcome(
                request, bool(answer.ok), answer.done_by, answer.term, answer.result or ""
            )
            if not outcome.ok and _refused_by_an_older_leader(outcome.result):
                raise RequestRefusedError(
                    f"the leader ({outcome.done_by}) refused request {request} as malformed: it"
                    f" runs a farmkeys older than this command's request format"
                    f" ({request_format.FORMAT}, kinds {', '.join(request_format.KINDS)})",
                    "nothing was done; upgrade farmkeys on the leader first (a rolling upgrade"
                    " upgrades the leader before it files requests from upgraded nodes), or file"
                    " the request from a node that runs the leader's version",
                )
            return outcome
        if not read_lease(db).valid:
            election = Election(db, node_id=config.node.id, lease=config.lease)
            if election.try_acquire():
                log.info("no node leads; %s took the lease for request %d", config.node.id, request)
                try:
                    Leader(config, db, directory, election).answer_requests()
                except Error as exc:
                    db.withdraw_request(request, f"withdrawn: {exc.what}")
                    raise
                finally:
                    election.release()
                continue
        if time.monotonic() >= deadline:
            if db.withdraw_request(request, "withdrawn: no leader answered in time"):
                lease = read_lease(db)
                raise LeaderTimeoutError(
                    f"the leader ({lease.holder_node or 'none'}) did not answer request"
                    f" {request} within {timeout_seconds:.0f} s; it was withdrawn",
                    "check `farmkeys serve` on the leader (`farmkeys status`), then try again",
                )
            continue  # answered as we withdrew it: report the answer
        time.sleep(0.2)
