"""Who asked: the account, host and `--reason` a request names, the checks on them at the
command line, and how `events` shows them (escaped: the audit table is a DB writer's)."""

from __future__ import annotations

import json
import os
import pwd
import uuid
from datetime import UTC, datetime

import pytest

from farmkeys import operator as requesting
from farmkeys.cli import parser
from farmkeys.cli.render import events_json, events_text
from farmkeys.db.rows import AuditEvent
from farmkeys.errors import RequestRefusedError

ME = pwd.getpwuid(os.geteuid()).pw_name
AT = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def event(**changes: object) -> AuditEvent:
    values: dict[str, object] = {
        "id": 7,
        "at": AT,
        "node": "node-a",
        "term": 3,
        "action": "generate",
        "purpose": "signing",
        "certificate": uuid.UUID(int=1),
        "thumbprint": "A" * 40,
        "master_key": None,
        "detail": "requested by the operator",
        "request": 12,
        "account": "alice via sudo as root",
        "host": "web1",
        "reason": "CHG-42",
        **changes,
    }
    return AuditEvent(**values)  # type: ignore[arg-type]


# -- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["rollover", "--purpose", "signing"],
        ["rollover", "--master-key", "--urgent"],
        ["repair-state", "--yes"],
        ["import", "adfs", "--encrypted-pfx", "f", "--purpose", "signing"],
    ],
)
def test_every_command_that_files_a_request_takes_a_reason(argv: list[str]) -> None:
    assert parser.parse_args([*argv, "--reason", "CHG-42: key leak"]).reason == "CHG-42: key leak"
    assert parser.parse_args(argv).reason is None


@pytest.mark.parametrize(
    ("reason", "why"),
    [
        ("x" * 201, "it is 201 characters long, more than 200"),
        ("rotating\n2026-12-04  health OK", "it holds the control character U+000A"),
        ("\x1b[8mhidden", "it holds the control character U+001B"),
        ("abc\u202edcba", "it holds the control character U+202E"),
        ("", "it is empty"),
    ],
)
def test_an_unfit_reason_is_a_one_line_usage_error(
    reason: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["rollover", "--reason", reason])
    assert done.value.code == 64
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("farmkeys: error:")]
    assert line.startswith(f"farmkeys: error: argument --reason: the reason is refused: {why};")
    assert "give one line of at most 200 printable characters" in line
    assert err.endswith(line + "\n")  # the error is the last line, and one line
    assert "hidden" not in err and "health OK" not in err  # the refused text is not echoed


def test_the_longest_reason_is_taken() -> None:
    assert parser.parse_args(["rollover", "--reason", "x" * 200]).reason == "x" * 200


# -- the account and host ------------------------------------------------------------------


def test_the_account_is_the_effective_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUDO_USER", raising=False)
    assert requesting.account() == ME
    monkeypatch.setenv("SUDO_USER", ME)  # sudo to oneself says nothing more
    assert requesting.account() == ME


def test_through_sudo_the_account_names_who_ran_sudo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")
    assert requesting.account() == f"alice via sudo as {ME}"


def test_an_effective_user_without_a_name_is_named_by_its_uid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unknown(uid: int) -> pwd.struct_passwd:
        raise KeyError(uid)

    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", unknown)
    assert requesting.account() == f"uid {os.geteuid()}"


def test_the_requester_is_this_account_this_host_and_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")
    monkeypatch.setattr("socket.gethostname", lambda: "web1")
    who = requesting.requester("CHG-42")
    assert (who.account, who.host, who.reason) == (f"alice via sudo as {ME}", "web1", "CHG-42")


@pytest.mark.parametrize(
    ("sudo_user", "host", "reason", "why"),
    [
        ("alice\n  health OK", "web1", None, "its account is unfit"),
        ("alice", "web\x1b[8m1", None, "its host is unfit"),
        ("alice", "web1", "a" * 201, "its reason is unfit"),
    ],
)
def test_a_requester_that_cannot_be_signed_is_refused_before_anything_is_asked(
    monkeypatch: pytest.MonkeyPatch, sudo_user: str, host: str, reason: str | None, why: str
) -> None:
    monkeypatch.setenv("SUDO_USER", sudo_user)
    monkeypatch.setattr("socket.gethostname", lambda: host)
    with pytest.raises(RequestRefusedError, match=f"the request cannot say who asks: {why}"):
        requesting.requester(reason)


# -- how `events` shows it -----------------------------------------------------------------


def test_events_shows_who_asked_for_each_event_of_a_request() -> None:
    (line,) = events_text([event()])
    assert line.endswith("[request 12 by alice via sudo as root on web1: 'CHG-42']")
    document = json.loads(events_json([event()], pretty=False))
    assert document[0]["requester"] == {
        "request": 12,
        "account": "alice via sudo as root",
        "host": "web1",
        "reason": "CHG-42",
    }
    without = event(reason=None)
    assert events_text([without])[0].endswith("[request 12 by alice via sudo as root on web1]")
    assert json.loads(events_json([without], pretty=False))[0]["requester"]["reason"] is None


def test_an_event_nobody_asked_for_names_no_requester() -> None:
    scheduled = event(request=None, account=None, host=None, reason=None)
    assert "[request" not in events_text([scheduled])[0]
    assert json.loads(events_json([scheduled], pretty=False))[0]["requester"] is None


def test_a_request_of_an_older_farmkeys_says_its_requester_was_not_recorded() -> None:
    old = event(account=None, host=None, reason=None)
    assert events_text([old])[0].endswith(
        "[request 12 by a requester not recorded (an older farmkeys filed it)]"
    )
    assert json.loads(events_json([old], pretty=False))[0]["requester"] == {
        "request": 12,
        "account": None,
        "host": None,
        "reason": None,
    }


def test_a_forged_account_host_or_reason_is_escaped_in_events() -> None:
    forged = event(
        account="alice\n2026-12-04T12:00:00  node-a  term 3 health OK",
        host="web1\x1b[8m",
        reason="fine\u202e\r\x9b2J",
    )
    (line,) = events_text([forged])
    assert "\n" not in line and "\x1b" not in line and "\r" not in line
    assert "\u202e" not in line and "\x9b" not in line
    assert "alice\\n2026-12-04T12:00:00  node-a  term 3 health OK on web1\\x1b[8m" in line
    # The reason is quoted (repr) and escaped: no raw control reaches the terminal.
    assert "fine" in line and "\\u202e" in line
    text = events_json([forged], pretty=False)
    assert all(c not in text for c in "\x1b\r\u202e\x9b")  # JSON escapes them
    assert "alice\\n2026" in text
    assert json.loads(text)[0]["requester"]["account"] == forged.account
