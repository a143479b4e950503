"""The tests' condition-wait helper (tests/support/wait.py)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from support.wait import WaitTimeout, async_wait_until, wait_until


def test_returns_the_first_truthy_value() -> None:
    counter = itertools.count()
    assert wait_until(lambda: next(counter) >= 3 and "ready", interval=0.001) == "ready"


def test_a_condition_that_never_holds_fails_naming_it_and_the_last_value() -> None:
    with pytest.raises(WaitTimeout, match=r"waiting for the moon \(last value: 0\)"):
        wait_until(lambda: 0, timeout=0.05, what="the moon", interval=0.01)


def test_ignored_exceptions_mean_not_yet_and_others_propagate() -> None:
    calls = itertools.count()

    def flaky() -> bool:
        if next(calls) < 2:
            raise ConnectionRefusedError
        return True

    assert wait_until(flaky, interval=0.001, ignore=(OSError,)) is True
    with pytest.raises(WaitTimeout, match="last error: ConnectionRefusedError"):
        wait_until(lambda: (_ for _ in ()).throw(ConnectionRefusedError()), timeout=0.05,
                   interval=0.01, ignore=(OSError,))
    with pytest.raises(KeyError):
        wait_until(lambda: {}["x"], timeout=1.0)


def test_async_waits_on_coroutines_too() -> None:
    counter = itertools.count()

    async def ready() -> int:
        return next(counter) >= 2

    assert asyncio.run(async_wait_until(ready, interval=0.001)) is True
    with pytest.raises(WaitTimeout):
        asyncio.run(async_wait_until(lambda: None, timeout=0.05, interval=0.01))
