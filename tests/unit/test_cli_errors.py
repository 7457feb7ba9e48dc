"""A bad config file or command line: one clear line and exit 1 (64 for usage), before any
server is asked. Unreachable servers and bad environment overrides on a real farm are in
tests/integration/test_failures.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from farmtools import one_error_line, run_cli

from farmkeys import cli


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "does not exist"),
        ("[farm\nname = 'x'", "is not valid TOML"),
        ("[farm]\nname = 'x'\nnmae = 'y'\n", "has an unknown key 'nmae'"),
        ("[farm]\nname = 42\n", "farm.name must be a string, not int 42"),
    ],
)
def test_bad_config_file_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, message: str
) -> None:
    path = tmp_path / "farmkeys.toml"
    if text is not None:
        path.write_text(text)
    for command in (["sync"], ["init"], ["status"], ["db", "upgrade"]):
        result = run_cli(*command, "--config", str(path), capsys=capsys)
        assert result.code == (3 if command == ["status"] else 1)  # status: cannot tell
        assert message in one_error_line(result)
        assert result.out == ""


def test_a_secret_of_the_wrong_type_is_not_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "farmkeys.toml"
    path.write_text("[directory]\npassword = 918273645\n")
    path.chmod(0o600)
    result = run_cli("sync", "--config", str(path), capsys=capsys)
    line = one_error_line(result)
    assert "directory.password must be a string" in line
    assert "918273645" not in result.err


def test_a_usage_error_exits_64_never_a_status_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["status", "--jsno"])
    assert done.value.code == 64
    assert "unrecognized arguments: --jsno" in capsys.readouterr().err


def test_debug_adds_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_cli("sync", "--debug", "--config", str(tmp_path / "none.toml"), capsys=capsys)
    assert result.code == 1
    assert "Traceback (most recent call last)" in result.err
    assert result.err.rstrip().splitlines()[-1].startswith("farmkeys: error: ")


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["init"], ["db", "upgrade"], ["sync"], ["status"]):
        with pytest.raises(SystemExit) as done:
            cli.main([*command, "--help"])
        assert done.value.code == 0
        assert "usage: farmkeys" in capsys.readouterr().out


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The stderr of a command line argparse refuses (exit 64)."""
    with pytest.raises(SystemExit) as done:
        cli.main(list(argv))
    assert done.value.code == 64
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_a_usage_error_shows_the_usage_of_the_command_it_was_given_to(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = usage_error(capsys, "status", "--jsno")
    assert err.startswith("usage: farmkeys status ")
    assert err.rstrip().endswith("see `farmkeys status --help`")
    err = usage_error(capsys, "escrow", "export", "--out", "x", "--bogus")
    assert err.startswith("usage: farmkeys escrow export ")
    assert "unrecognized arguments: --bogus" in err


@pytest.mark.parametrize(
    ("argv", "meant"),
    [
        (("stauts",), "status"),
        (("rolover",), "rollover"),
        (("db", "upgarde"), "upgrade"),
        (("rollover", "--purpose", "sigining"), "signing"),
    ],
)
def test_a_mistyped_command_or_choice_gets_a_did_you_mean(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], meant: str
) -> None:
    assert f"did you mean '{meant}'?" in usage_error(capsys, *argv)


def test_nothing_close_gets_no_suggestion(capsys: pytest.CaptureFixture[str]) -> None:
    assert "did you mean" not in usage_error(capsys, "xyzzy")


@pytest.mark.parametrize("wait", ["-5", "0", "inf", "nan", "soon"])
def test_wait_must_be_a_positive_number_of_seconds(
    capsys: pytest.CaptureFixture[str], wait: str
) -> None:
    err = usage_error(capsys, "rollover", "--wait", wait)
    assert "argument --wait:" in err


def test_status_json_prints_a_document_even_when_it_cannot_tell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli("status", "--json", "--config", str(tmp_path / "none.toml"), capsys=capsys)
    assert result.code == 3
    doc = json.loads(result.out)
    assert doc["health"] == "unknown"
    (problem,) = doc["problems"]
    assert "does not exist" in problem
    assert "does not exist" in one_error_line(result)  # and the one line on stderr


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (("--master-key",), "--master-key does not go with it"),
        (("--urgent",), "--urgent does not go with it"),
        (("--purpose", "all"), "give --purpose signing or --purpose decryption"),
    ],
)
def test_revert_refuses_what_cannot_be_reverted_as_a_usage_error(
    capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], said: str
) -> None:
    err = usage_error(capsys, "rollover", "--revert", *extra)
    (line,) = [x for x in err.splitlines() if x.startswith("farmkeys: error: ")]
    assert said in line and "--revert" in line


def test_revert_takes_a_reason_and_defaults_to_signing() -> None:
    from farmkeys.cli.parser import parse_args

    args = parse_args(["rollover", "--revert", "--yes", "--reason", "CHG-7 SP pinned the key"])
    assert args.revert and args.purpose is None and args.reason == "CHG-7 SP pinned the key"
