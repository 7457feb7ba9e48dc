"""Transient failures are retried with backoff within a budget; final ones are not."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from farmkeys._retry import RetryExhaustedError, call_with_retry
from farmkeys.config import RetryConfig

POLICY = RetryConfig(total_seconds=5.0, initial_backoff_seconds=0.01, max_backoff_seconds=0.02)


class Transient(Exception):
    pass


class Final(Exception):
    pass


def flaky(failures: int, exc: type[Exception] = Transient) -> tuple[list[int], Callable[[], str]]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise exc("down")
        return "up"

    return calls, fn


def test_transient_failures_are_retried_until_success() -> None:
    calls, fn = flaky(3)
    sleeps: list[float] = []
    result = call_with_retry(
        fn,
        policy=POLICY,
        is_transient=lambda e: isinstance(e, Transient),
        what="test",
        sleep=sleeps.append,
    )
    assert result == "up"
    assert len(calls) == 4
    assert len(sleeps) == 3
    assert all(0 <= s <= POLICY.max_backoff_seconds for s in sleeps)


def test_a_final_failure_is_raised_at_once() -> None:
    calls, fn = flaky(3, Final)
    with pytest.raises(Final):
        call_with_retry(
            fn,
            policy=POLICY,
            is_transient=lambda e: isinstance(e, Transient),
            what="test",
            sleep=lambda _: None,
        )
    assert len(calls) == 1


def test_an_exhausted_budget_reports_the_last_cause_and_the_attempts() -> None:
    calls, fn = flaky(10**6)
    policy = RetryConfig(total_seconds=0.0, initial_backoff_seconds=0.01, max_backoff_seconds=0.01)
    with pytest.raises(RetryExhaustedError) as caught:
        call_with_retry(
            fn,
            policy=policy,
            is_transient=lambda e: isinstance(e, Transient),
            what="test",
            sleep=lambda _: None,
        )
    assert isinstance(caught.value.last, Transient)
    assert caught.value.attempts == len(calls) == 1
    assert caught.value.summary().startswith("after 1 attempt over")


def test_an_outage_is_one_warning_and_its_end_one_info_line_under_farmkeys(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="farmkeys")
    down = [True]

    def fn() -> str:
        if down[0]:
            raise Transient("connection refused")
        return "up"

    policy = RetryConfig(total_seconds=0.05, initial_backoff_seconds=0.01, max_backoff_seconds=0.01)
    # A serve renewing its lease through an outage: several calls, several attempts each.
    for _ in range(3):
        with pytest.raises(RetryExhaustedError):
            call_with_retry(
                fn, policy=policy, is_transient=lambda e: isinstance(e, Transient), what="db X"
            )
    down[0] = False
    assert call_with_retry(fn, policy=policy, is_transient=lambda e: True, what="db X") == "up"
    assert call_with_retry(fn, policy=policy, is_transient=lambda e: True, what="db X") == "up"
    above_debug = [(r.name, r.levelname, r.getMessage()) for r in caplog.records if r.levelno > 10]
    assert above_debug[0] == (
        "farmkeys",
        "WARNING",
        "db X is unreachable: connection refused; retrying for up to 0 s",
    )
    assert [level for _, level, _ in above_debug] == ["WARNING", "INFO"]
    assert above_debug[1][2].startswith("db X is reachable again after ")
    # The attempts in between are there for --debug.
    assert any(r.levelname == "DEBUG" and "attempt" in r.getMessage() for r in caplog.records)


def test_outages_of_two_endpoints_are_told_apart(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="farmkeys")
    for what in ("db Y", "directory Z", "db Y"):
        with pytest.raises(RetryExhaustedError):
            call_with_retry(
                lambda: (_ for _ in ()).throw(Transient("down")),
                policy=RetryConfig(total_seconds=0.0),
                is_transient=lambda e: True,
                what=what,
            )
    assert [r.getMessage() for r in caplog.records] == [
        "db Y is unreachable: down",
        "directory Z is unreachable: down",
    ]
