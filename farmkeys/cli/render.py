"""What `status`, `events` and a leader's answer print: text for a person, JSON for a machine.

Everything here may quote the config DB, which is attacker-writable: every text
line passes through :func:`farmkeys.terminal.escape` on its way out. No I/O: the
commands print what these return.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from farmkeys.terminal import escape

if TYPE_CHECKING:
    from farmkeys.db.rows import AuditEvent
    from farmkeys.requesting import RolloverOutcome


def status_json(doc: dict[str, Any], *, pretty: bool) -> str:
    """The status document as JSON: indented for a person at a terminal (``pretty``).

    Compact for a program: json's C encoder only runs without indent, so a farm of
    1,000 nodes prints in a few ms instead of ~70.
    """
    return json.dumps(doc, indent=2 if pretty else None)


def status_text(doc: dict[str, Any]) -> str:
    """The status document as a person reads it, each line escaped (it quotes the config DB)."""
    farm = doc["farm"]
    lines = [
        f"farm      {farm['name']}   DKM group {farm['dkm_group']}",
        f"health    {doc['health'].upper()}",
    ]
    lines += [f"  - {p}" for p in doc["problems"]]
    leader = doc.get("leader")
    lines.append(
        f"leader    {leader['node']} (term {leader['term']},"
        f" lease until {leader['expires_at'][:19]})"
        if leader
        else "leader    none"
    )
    lines += ["", "certificates", *_certificate_lines(doc)]
    lines += ["", "master keys", *_master_key_lines(doc)]
    state = doc.get("farm_state") or {}
    trust = {True: "authentic", False: "NOT AUTHENTIC", None: "not checked"}[state.get("authentic")]
    lines += ["", f"farm state  version {state.get('version')}  {trust}"]
    lines += ["", "nodes", *_node_lines(doc)]
    parties = doc.get("relying_parties") or []
    if parties:
        lines += ["", "relying parties"]
    for rp in parties:
        seen = {True: "has the secondary", False: "HAS NOT FETCHED THE SECONDARY", None: ""}
        last = (rp["last_fetch_at"] or "never")[:19]
        lines.append(f"  {rp['name']:<20} last fetch {last}  {seen[rp['has_secondary']]}".rstrip())
    return "\n".join(escape(line) for line in lines)


def _certificate_lines(doc: dict[str, Any]) -> list[str]:
    lines = []
    for c in doc["certificates"]:
        nxt = c.get("next_action")
        then = f"  next: {nxt['action']} at {nxt['at'][:19]}" if nxt else ""
        lines.append(
            f"  {c['purpose']:<10} {c['role']:<9} {c['thumbprint']}"
            f"  valid {c['not_before'][:19]} .. {c['not_after'][:19]}  key {c['master_key']}{then}"
        )
    return lines


def _master_key_lines(doc: dict[str, Any]) -> list[str]:
    lines = []
    for k in doc["master_keys"]:
        created = (k["created_at"] or "?")[:19]
        when = ""
        if k.get("roll_at"):
            when = f"  rolls at {k['roll_at'][:19]}"
        elif k.get("delete_at"):
            when = f"  delete at {k['delete_at'][:19]}"
        gone = k.get("in_directory") is False and k["state"] != "deleted"
        missing = "  MISSING FROM THE DIRECTORY" if gone else ""
        lines.append(
            f"  {k['id']}  {k['state']:<8}  created {created}  sealed: {k['sealed_live']} live,"
            f" {k['sealed_archived']} archived{when}{missing}"
        )
    return lines


def _node_lines(doc: dict[str, Any]) -> list[str]:
    if not doc["nodes"]:
        return ["  (none has synced yet)"]
    lines = []
    for n in doc["nodes"]:
        state = "in sync" if n["in_sync"] else "NOT IN SYNC"
        last = (n["last_sync"] or "never")[:19]
        contact = (n.get("heartbeat_at") or n["last_seen"] or "never")[:19]
        dc = f"  directory {n['directory_server']}" if n.get("directory_server") else ""
        lines.append(
            f"  {n['id']:<20} {state:<12} last sync {last}  generation {n['generation']}"
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
    }


def events_text(events: Sequence[AuditEvent]) -> list[str]:
    """One escaped line per event, or one saying there is none."""
    lines = []
    for e in events:
        term = "-" if e.term is None else e.term
        key = None if e.master_key is None else str(e.master_key)
        what = " ".join(x for x in (e.action, e.purpose, e.thumbprint, key) if x)
        line = f"{e.at.isoformat()[:19]}  {e.node:<12} term {term!s:<4} {what}  {e.detail}"
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
