"""tests/support's expect_ok: a command that failed says what it was and what it printed."""

from __future__ import annotations

import pytest
from farmtools import STDOUT_TAIL_LINES, Result, expect_ok


def test_a_command_that_exited_0_is_returned() -> None:
    result = Result(0, "done\n", "", ("farmkeys", "sync"))
    assert expect_ok(result) is result


def test_a_failure_names_the_command_its_code_its_stderr_and_the_end_of_its_stdout() -> None:
    out = "".join(f"line {n}\n" for n in range(STDOUT_TAIL_LINES + 5))
    result = Result(
        3, out, "farmkeys: error: the config DB is unreachable\n", ("farmkeys", "status")
    )
    with pytest.raises(AssertionError) as failed:
        expect_ok(result)
    message = str(failed.value)
    assert message.startswith("farmkeys status exited 3, not 0")
    assert "farmkeys: error: the config DB is unreachable" in message
    assert f"line {STDOUT_TAIL_LINES + 4}" in message
    assert "line 4\n" not in message  # only the tail


def test_a_failure_of_an_unknown_command_with_no_output_still_says_so() -> None:
    with pytest.raises(
        AssertionError, match=r"the command exited 1, not 0\n--- stderr:\n\(empty\)"
    ):
        expect_ok(Result(1, "", ""))
