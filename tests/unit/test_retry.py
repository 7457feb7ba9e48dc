"""Transient failures are retried with backoff within a budget; final ones are not."""

from __future__ import annotations

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
