"""Retrying transient failures to reach a server, with tenacity.

Exponential backoff with full jitter, bounded by a total wait. Only failures
the caller judges transient are retried: a refused password is final at once.

It logs one line per outage of an endpoint, not one per attempt: a WARNING at the
first failed attempt (what failed, how long it will keep trying), and an INFO line
when the endpoint answers again after one; the attempts between are DEBUG. A
long-running ``serve`` whose every lease renewal retries the same config DB thus says
"unreachable" once and "reachable again" once. Lines go to the ``farmkeys`` logger.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from farmkeys.config import RetryConfig

T = TypeVar("T")

# Not this module's name: an operator reads "farmkeys", not an internal module.
log = logging.getLogger("farmkeys")


class _Outages:
    """The endpoints (by ``what``) whose last attempt failed: their outage is logged."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._down: dict[str, float] = {}  # endpoint -> monotonic time of its first failure

    def failed(self, what: str, exc: BaseException, *, retrying_for: float) -> None:
        with self._lock:
            if what in self._down:
                log.debug("%s: still unreachable (%s)", what, _one_line(exc))
                return
            self._down[what] = time.monotonic()
        ending = f"; retrying for up to {retrying_for:.0f} s" if retrying_for > 0 else ""
        log.warning("%s is unreachable: %s%s", what, _one_line(exc), ending)

    def answered(self, what: str) -> None:
        with self._lock:
            since = self._down.pop(what, None)
        if since is not None:
            log.info("%s is reachable again after %.1f s", what, time.monotonic() - since)


_outages = _Outages()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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
        result = fn()
    except BaseException as exc:
        if not is_transient(exc):
            raise
        _outages.failed(what, exc, retrying_for=policy.total_seconds)
        if policy.total_seconds <= 0:
            raise RetryExhaustedError(exc, 1, time.monotonic() - started) from exc
        first: BaseException | None = exc
    else:
        _outages.answered(what)
        return result
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
        log.debug(
            "%s: attempt %d failed (%s); retrying in %.1f s",
            what,
            state.attempt_number,
            "" if exc is None else _one_line(exc),
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
        result = retrying(attempt)
    except tenacity.RetryError as exc:
        last = exc.last_attempt.exception()
        assert last is not None
        raise RetryExhaustedError(
            last, exc.last_attempt.attempt_number, time.monotonic() - started
        ) from last
    _outages.answered(what)
    return result
