"""Retrying transient failures to reach a server, with tenacity.

Exponential backoff with full jitter, bounded by a total wait. Only failures
the caller judges transient are retried: a refused password is final at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from farmkeys.config import RetryConfig

T = TypeVar("T")

log = logging.getLogger(__name__)


class RetryExhaustedError(Exception):
    """Every attempt failed transiently until the total wait ran out.

    Internal: callers turn it into a :class:`farmkeys.errors.Error` that names
    the endpoint and ``last``, the cause of the final attempt.
    """

    def __init__(self, last: BaseException, attempts: int, elapsed: float) -> None:
        super().__init__(str(last))
        self.last = last
        self.attempts = attempts
        self.elapsed = elapsed

    def summary(self) -> str:
        """``after N attempts over S s``, for the final error message."""
        plural = "" if self.attempts == 1 else "s"
        return f"after {self.attempts} attempt{plural} over {self.elapsed:.1f} s"


def call_with_retry(
    fn: Callable[[], T],
    *,
    policy: RetryConfig,
    is_transient: Callable[[BaseException], bool],
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, fails for good, or ``policy.total_seconds`` pass.

    A non-transient exception propagates unchanged from the attempt that
    raised it. When transient failures exhaust the budget, raises
    :class:`RetryExhaustedError` carrying the last one. ``what`` names the
    endpoint in the log lines written between attempts.
    """
    started = time.monotonic()
    # The first attempt needs no retry machinery: most succeed, and importing tenacity is a
    # cost every short-lived command (a `farmkeys sync` at a service's start) would pay.
    try:
        return fn()
    except BaseException as exc:
        if not is_transient(exc) or policy.total_seconds <= 0:
            if is_transient(exc):
                raise RetryExhaustedError(exc, 1, time.monotonic() - started) from exc
            raise
        first: BaseException | None = exc
    import tenacity

    def attempt() -> T:
        # Tenacity's first attempt is the one already made: it fails the same way again.
        nonlocal first
        if first is not None:
            failed, first = first, None
            raise failed
        return fn()

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s: attempt %d failed (%s); retrying in %.1f s",
            what,
            state.attempt_number,
            " ".join(str(exc).split()),
            state.upcoming_sleep,
        )

    retrying = tenacity.Retrying(
        # Stop before a sleep would carry the total wait past the budget.
        stop=tenacity.stop_before_delay(policy.total_seconds),
        wait=tenacity.wait_random_exponential(
            multiplier=policy.initial_backoff_seconds, max=policy.max_backoff_seconds
        ),
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=False,
    )
    try:
        return retrying(attempt)
    except tenacity.RetryError as exc:
        last = exc.last_attempt.exception()
        assert last is not None
        raise RetryExhaustedError(
            last, exc.last_attempt.attempt_number, time.monotonic() - started
        ) from last
