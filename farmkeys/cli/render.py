"""What `status`, `events` and a leader's answer print: text for a person, JSON for a machine.

Everything here may quote the config DB, which is attacker-writable: every text
line passes through :func:`farmkeys.terminal.escape` on its way out. No I/O: the
commands print what these return.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from farmkeys.terminal import escape

if TYPE_CHECKING:
    from farmkeys.db.rows import AuditEvent
    from farmkeys.requesting import RolloverOutcome
    from farmkeys.status import (
        CertificateStatus,
        FarmStatus,
        MasterKeyStatus,
        NodeStatus,
    )


def status_json(status: FarmStatus, *, pretty: bool) -> str:
    """The status document as JSON: indented for a person at a terminal (``pretty``).

    Compact for a program: json's C encoder only runs without indent, so a farm of
    1,000 nodes prints in a few ms instead of ~70.
    """
    return json.dumps(status.to_json(), indent=2 if pretty else None)


def status_text(status: FarmStatus) -> str:
    """The status document as a person reads it, each line escaped (it quotes the config DB)."""
    farm, leader = status.farm, status.leader
    lines = [
        f"farm      {farm.name}   DKM group {farm.dkm_group}",
        f"health    {status.health.upper()}",
    ]
    lines += [f"  - {p}" for p in status.problems]
    lines.append(
        f"leader    {leader.node} (term {leader.term}, lease until {_short(leader.expires_at)})"
        if leader
        else "leader    none"
    )
    lines += ["", "certificates", *_certificate_lines(status.certificates)]
    lines += ["", "master keys", *_master_key_lines(status.master_keys)]
    state = status.farm_state
    trust = {True: "authentic", False: "NOT AUTHENTIC", None: "not checked"}[state.authentic]
    lines += ["", f"farm state  version {state.version}  {trust}"]
    lines += ["", "nodes", *_node_lines(status.nodes)]
    if status.relying_parties:
        lines += ["", "relying parties"]
    for rp in status.relying_parties:
        seen = {True: "has the secondary", False: "HAS NOT FETCHED THE SECONDARY", None: ""}
        last = _short(rp.last_fetch_at, "never")
        lines.append(f"  {rp.name:<20} last fetch {last}  {seen[rp.has_secondary]}".rstrip())
    return "\n".join(escape(line) for line in lines)


def _short(when: datetime | str | None, missing: str = "") -> str:
    """A time to the second, as a line shows it (ISO 8601 text is cut to its seconds)."""
    if when is None:
        return missing
    return (when if isinstance(when, str) else when.isoformat())[:19]


def _certificate_lines(certificates: Sequence[CertificateStatus]) -> list[str]:
    lines = []
    for c in certificates:
        nxt = c.next_action
        then = f"  next: {nxt.action} at {_short(nxt.at)}" if nxt else ""
        lines.append(
            f"  {c.purpose:<10} {c.role:<9} {c.thumbprint}"
            f"  valid {_short(c.not_before)} .. {_short(c.not_after)}  key {c.master_key}{then}"
        )
    return lines


def _master_key_lines(keys: Sequence[MasterKeyStatus]) -> list[str]:
    lines = []
    for k in keys:
        created = _short(k.created_at, "?")
        when = ""
        if k.roll_at:
            when = f"  rolls at {_short(k.roll_at)}"
        elif k.delete_at:
            when = f"  delete at {_short(k.delete_at)}"
        gone = k.in_directory is False and k.state != "deleted"
        missing = "  MISSING FROM THE DIRECTORY" if gone else ""
        lines.append(
            f"  {k.id}  {k.state:<8}  created {created}  sealed: {k.sealed_live} live,"
            f" {k.sealed_archived} archived{when}{missing}"
        )
    return lines


def _node_lines(nodes: Sequence[NodeStatus]) -> list[str]:
    if not nodes:
        return ["  (none has synced yet)"]
    lines = []
    for n in nodes:
        state = "in sync" if n.in_sync else "NOT IN SYNC"
        last = _short(n.last_sync, "never")
        contact = _short(n.heartbeat_at or n.last_seen, "never")
        dc = f"  directory {n.directory_server}" if n.directory_server else ""
        lines.append(
            f"  {n.id:<20} {state:<12} last sync {last}  generation {n.generation}"
            f"  last contact {contact}{dc}"
        )
    return lines


def events_json(events: Sequence[AuditEvent]) -> str:
    """The audit log as `events --json` prints it (times in ISO 8601, ids as text)."""
    return json.dumps([_event_json(e) for e in events], indent=2)


def _event_json(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "at": event.at.isoformat(),
        "node": event.node,
        "term": event.term,
        "action": event.action,
        "purpose": event.purpose,
        "certificate": None if event.certificate is None else str(event.certificate),
        "thumbprint": event.thumbprint,
        "master_key": None if event.master_key is None else str(event.master_key),
        "detail": event.detail,
        "requester": _requester_json(event),
    }


def _requester_json(event: AuditEvent) -> dict[str, Any] | None:
    """Who asked for an event's request (None: nobody asked; account and host None: a
    farmkeys before request format 2 did not say)."""
    if event.request is None:
        return None
    return {
        "request": event.request,
        "account": event.account,
        "host": event.host,
        "reason": event.reason,
    }


def _asked(event: AuditEvent) -> str:
    """Who asked for an event, as its line says it (empty: nobody asked)."""
    if event.request is None:
        return ""
    if event.account is None:
        who = "a requester not recorded (an older farmkeys filed it)"
    else:
        who = f"{event.account} on {event.host}"
    why = "" if event.reason is None else f": {event.reason!r}"
    return f"  [request {event.request} by {who}{why}]"


def events_text(events: Sequence[AuditEvent]) -> list[str]:
    """One escaped line per event, or one saying there is none."""
    lines = []
    for e in events:
        term = "-" if e.term is None else e.term
        key = None if e.master_key is None else str(e.master_key)
        what = " ".join(x for x in (e.action, e.purpose, e.thumbprint, key) if x)
        line = f"{_short(e.at)}  {e.node:<12} term {term!s:<4} {what}  {e.detail}{_asked(e)}"
        lines.append(escape(line).rstrip())
    return lines or ["no events"]


def answer_lines(kind: str, outcome: RolloverOutcome) -> list[str]:
    """The leader's answer to a request, as the command prints it.

    The answer is read from the config DB: its lines are the leader's (split at newlines
    only), every control character within them escaped.
    """
    by = escape(str(outcome.done_by))
    lines = [f"{kind} request {outcome.request}, answered by {by} (term {outcome.term}):"]
    for line in outcome.result.removesuffix("\n").split("\n") if outcome.result else ():
        lines.append(f"  {escape(line)}")
    return lines
