"""What `status`, `events` and a leader's answer print: text for a person, JSON for a machine.

Everything here may quote the config DB, which is attacker-writable: every text
line passes through :func:`farmkeys.terminal.escape` on its way out. No I/O: the
commands print what these return.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from farmkeys.terminal import escape

if TYPE_CHECKING:
    from farmkeys.check import Report as CheckReport
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


# `status` fits a terminal of this many columns; `--wide` prints each item on one line.
WIDTH = 100


def status_text(status: FarmStatus, *, wide: bool = False) -> str:
    """The status document as a person reads it, each line escaped (it quotes the config DB).

    At most :data:`WIDTH` columns unless ``wide``: an item too long for one line goes on
    on the next, indented. Every time is UTC, written with its ``Z``.
    """
    farm, leader = status.farm, status.leader
    lines = [
        f"farm      {farm.name}   DKM group {farm.dkm_group}",
        f"health    {status.health.upper()}",
    ]
    for problem in status.problems:
        lines += _wrapped(problem, wide=wide)
    if leader is None:
        lines.append("leader    none")
    else:
        until = f"lease until {_short(leader.expires_at)}"
        lines += _fit(
            ["leader", f"{leader.node} (term {leader.term})", until], wide=wide, first="    "
        )
    lines += ["", "certificates", *_certificate_lines(status.certificates, wide=wide)]
    lines += ["", "master keys", *_master_key_lines(status.master_keys, wide=wide)]
    state = status.farm_state
    trust = {True: "authentic", False: "NOT AUTHENTIC", None: "not checked"}[state.authentic]
    lines += ["", f"farm state  version {state.version}  {trust}"]
    lines += ["", "nodes", *node_lines(status.nodes, wide=wide)]
    if status.relying_parties:
        lines += ["", "relying parties"]
    for rp in status.relying_parties:
        seen = {True: "has the secondary", False: "HAS NOT FETCHED THE SECONDARY", None: ""}
        last = f"last fetch {_short(rp.last_fetch_at, 'never')}"
        lines += _fit([f"  {rp.name:<20}", last, seen[rp.has_secondary]], wide=wide)
    return "\n".join(escape(line) for line in lines)


def _fit(parts: Sequence[str], *, wide: bool, indent: int = 13, first: str = "  ") -> list[str]:
    """``parts`` joined by ``first`` after the first part and two spaces after the others, on
    lines of at most WIDTH columns (a part that does not fit starts a line, ``indent`` in);
    one line when ``wide``. Empty parts are left out."""
    # Escaped first: what is measured and wrapped is what is printed, no raw control
    # character reaches the wrapping, and a DB text can only ever continue an indented line.
    parts = [escape(part) for part in parts if part]
    if not parts:
        return []
    lines = [parts[0]]
    for i, part in enumerate(parts[1:]):
        gap = first if i == 0 else "  "
        if wide or len(lines[-1]) + len(gap) + len(part) <= WIDTH:
            lines[-1] += gap + part
        else:
            lines.append(" " * indent + part)
    return lines


def _wrapped(problem: str, *, wide: bool) -> list[str]:
    """A problem as a bullet, wrapped at WIDTH at its spaces unless ``wide``."""
    problem = escape(problem)  # before wrapping: see _fit
    if wide:
        return [f"  - {problem}"]
    return textwrap.wrap(
        problem,
        width=WIDTH,
        initial_indent="  - ",
        subsequent_indent="    ",
        break_long_words=False,
        break_on_hyphens=False,
    ) or ["  - "]


def _short(when: datetime | str | None, missing: str = "") -> str:
    """A time to the second in UTC, with its zone: ``2026-12-04T18:22:30Z``."""
    if when is None:
        return missing
    if isinstance(when, str):
        try:
            moment = datetime.fromisoformat(when)
        except ValueError:
            return when  # not a time after all: shown as it is (escaped with its line)
    else:
        moment = when
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # the config DB's times are UTC
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _certificate_lines(certificates: Sequence[CertificateStatus], *, wide: bool) -> list[str]:
    lines = []
    for c in certificates:
        nxt = c.next_action
        lines += _fit(
            [
                f"  {c.purpose:<10} {c.role:<9}",
                c.thumbprint,
                f"valid {_short(c.not_before)} .. {_short(c.not_after)}",
                f"key {c.master_key}",
                f"next: {nxt.action} at {_short(nxt.at)}" if nxt else "",
            ],
            wide=wide,
            first=" ",
        )
    return lines


def _master_key_lines(keys: Sequence[MasterKeyStatus], *, wide: bool) -> list[str]:
    lines = []
    for k in keys:
        when = ""
        if k.roll_at:
            when = f"rolls at {_short(k.roll_at)}"
        elif k.delete_at:
            when = f"delete at {_short(k.delete_at)}"
        gone = k.in_directory is False and k.state != "deleted"
        lines += _fit(
            [
                f"  {k.id}",
                f"{k.state:<8}",
                f"created {_short(k.created_at, '?')}",
                f"sealed: {k.sealed_live} live, {k.sealed_archived} archived",
                when,
                "MISSING FROM THE DIRECTORY" if gone else "",
            ],
            wide=wide,
            indent=40,
        )
    return lines


def node_lines(nodes: Sequence[NodeStatus], *, wide: bool) -> list[str]:
    """One item per node, as `status` and `nodes` print them (escaped)."""
    if not nodes:
        return ["  (none has synced yet)"]
    lines = []
    for n in nodes:
        state = "in sync" if n.in_sync else "NOT IN SYNC"
        lines += _fit(
            [
                f"  {n.id:<20}",
                f"{state:<11}",
                _serving(n),
                f"last sync {_short(n.last_sync, 'never')}",
                f"generation {n.generation}",
                f"last contact {_short(n.heartbeat_at or n.last_seen, 'never')}",
                f"farmkeys {n.version}" if n.version else "",
                f"directory {n.directory_server}" if n.directory_server else "",
            ],
            wide=wide,
            indent=23,
            first=" ",
        )
    return lines


def check_lines(report: CheckReport) -> list[str]:
    """`farmkeys check` for a person: one escaped line per check, the fix after a dash."""
    lines = []
    for c in report.checks:
        fix = f" — {c.fix}" if c.fix and c.result != "ok" else ""
        lines.append(escape(f"{c.result:<8} {c.name:<24} {c.detail}{fix}"))
    return lines


def check_json(report: CheckReport, *, pretty: bool) -> str:
    return json.dumps(report.to_json(), indent=2 if pretty else None)


def _serving(node: NodeStatus) -> str:
    """Whether the node's `serve` runs: "serving", "stopped since <time>", "sync only"."""
    if node.serving == "stopped":
        return f"stopped since {_short(node.stopped_at)}"
    return "serving" if node.serving == "serving" else "sync only"


def events_json(events: Sequence[AuditEvent], *, pretty: bool) -> str:
    """The audit log as `events --json` prints it (times in ISO 8601, ids as text): indented
    for a person at a terminal (``pretty``), compact for a program, as `status --json`."""
    return json.dumps([_event_json(e) for e in events], indent=2 if pretty else None)


def nodes_json(nodes: Sequence[NodeStatus], *, pretty: bool) -> str:
    """`farmkeys nodes --json`: ``{"nodes": [...]}``, each as in `status --json`."""
    return json.dumps({"nodes": [n.to_json() for n in nodes]}, indent=2 if pretty else None)


def unknown_status_json(problem: str, *, pretty: bool) -> str:
    """What `status --json` prints when it cannot tell (the config DB out of reach, a bad
    configuration): the status document's ``health`` and ``problems``, nothing else known."""
    return json.dumps({"health": "unknown", "problems": [problem]}, indent=2 if pretty else None)


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
    if event.request is None and event.account is None:
        return None
    return {
        "request": event.request,
        "account": event.account,
        "host": event.host,
        "reason": event.reason,
    }


def _asked(event: AuditEvent) -> str:
    """Who asked for an event, as its line says it (empty: nobody asked)."""
    why = "" if event.reason is None else f": {event.reason!r}"
    if event.request is None:
        # A command that changed the farm itself names who ran it; else nobody asked.
        return "" if event.account is None else f"  [by {event.account} on {event.host}{why}]"
    if event.account is None:
        who = "a requester not recorded (an older farmkeys filed it)"
    else:
        who = f"{event.account} on {event.host}"
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
