"""Wait for a condition with a deadline: the one way tests synchronise with what runs beside
them (daemons, operators, the kernel). No fixed sleeps.

``wait_until(predicate)`` calls ``predicate`` until it returns something truthy and returns
that value; at the deadline it fails with ``WaitTimeout`` (an ``AssertionError``), naming what
it waited for and the last value or exception seen. ``async_wait_until`` does the same on an
event loop, for predicates that may be coroutines.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["WaitTimeout", "async_wait_until", "wait_until"]

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold before the deadline."""


def _fail(what: str, timeout: float, last: Any, error: BaseException | None) -> WaitTimeout:
    seen = f"last error: {error!r}" if error is not None else f"last value: {last!r}"
    return WaitTimeout(f"timed out after {timeout}s waiting for {what} ({seen})")


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition",
               interval: float = 0.05,
               ignore: tuple[type[BaseException], ...] = ()) -> T:
    """``predicate()`` until truthy (its value is returned); exceptions in ``ignore`` count
    as 'not yet'. Fails with ``WaitTimeout`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    error: BaseException | None = None
    while True:
        try:
            last = predicate()
            error = None
            if last:
                return last
        except ignore as exc:
            error = exc
        if time.monotonic() >= deadline:
            raise _fail(what, timeout, last, error)
        time.sleep(interval)


async def async_wait_until(predicate: Callable[[], Awaitable[T] | T], timeout: float = 30.0,
                           what: str = "condition", interval: float = 0.05,
                           ignore: tuple[type[BaseException], ...] = ()) -> T:
    """``wait_until`` for an event loop; ``predicate`` may return an awaitable."""
    deadline = time.monotonic() + timeout
    last: Any = None
    error: BaseException | None = None
    while True:
        try:
            value = predicate()
            last = await value if inspect.isawaitable(value) else value
            error = None
            if last:
                return last  # type: ignore[no-any-return]
        except ignore as exc:
            error = exc
        if time.monotonic() >= deadline:
            raise _fail(what, timeout, last, error)
        await asyncio.sleep(interval)
