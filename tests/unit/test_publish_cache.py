"""The /metrics document's cache (farmkeys.publish.cache.Refreshed): made at most once per
period however many callers ask, one caller making it while the others get the last one."""

from __future__ import annotations

import threading

import pytest

from farmkeys.publish.cache import Refreshed


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_callers_within_the_period_get_the_value_made_once() -> None:
    clock = Clock()
    made = iter(range(100))
    cached = Refreshed(lambda: next(made), period=1.0, clock=clock)
    assert [cached.get() for _ in range(50)] == [0] * 50
    clock.now += 0.99
    assert cached.get() == 0
    clock.now += 0.02  # a period after it was made
    assert cached.get() == 1
    assert cached.makes == 2


def test_while_one_caller_makes_it_the_others_get_the_last_value_at_once() -> None:
    clock = Clock()
    entered, release = threading.Event(), threading.Event()
    values = iter(["first", "second"])

    def make() -> str:
        value = next(values)
        if value == "second":
            entered.set()
            assert release.wait(30)
        return value

    cached = Refreshed(make, period=1.0, clock=clock)
    assert cached.get() == "first"
    clock.now += 5
    got: list[str] = []
    maker = threading.Thread(target=lambda: got.append(cached.get()))
    maker.start()
    try:
        assert entered.wait(30)
        # Scrapers meanwhile neither wait nor make it again: the last value, at once.
        assert [cached.get() for _ in range(20)] == ["first"] * 20
        assert cached.makes == 1
    finally:
        release.set()
        maker.join(30)
    assert got == ["second"] and cached.get() == "second" and cached.makes == 2


def test_callers_before_the_first_value_wait_for_the_one_making_it() -> None:
    entered, release = threading.Event(), threading.Event()
    calls = []

    def make() -> str:
        calls.append(1)
        entered.set()
        assert release.wait(30)
        return "doc"

    cached = Refreshed(make, period=60.0)
    got: list[str] = []
    lock = threading.Lock()

    def scrape() -> None:
        value = cached.get()
        with lock:
            got.append(value)

    threads = [threading.Thread(target=scrape) for _ in range(12)]
    for t in threads:
        t.start()
    assert entered.wait(30)
    release.set()
    for t in threads:
        t.join(30)
    assert got == ["doc"] * 12 and len(calls) == 1


def test_a_failed_make_keeps_nothing_and_the_next_caller_tries_again() -> None:
    attempts = []

    def make() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("the DB is away")
        return "doc"

    cached = Refreshed(make, period=60.0)
    with pytest.raises(RuntimeError):
        cached.get()
    assert cached.get() == "doc" and len(attempts) == 2


def test_the_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Refreshed(lambda: 1, period=0)
