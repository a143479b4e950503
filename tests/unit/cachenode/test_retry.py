"""The one retry policy: what it retries, for how long, and what it reports."""

from __future__ import annotations

import threading

import pytest

from cistern.cachenode.retry import RetryPolicy
from cistern.cachenode.store import PermanentStoreError, StoreError, TemporaryStoreError

FAST = RetryPolicy(base_delay=0.001, max_delay=0.005, deadline=5.0)


class Script:
    """A call that raises the given errors in turn, then returns ``result``."""

    def __init__(self, *errors: Exception, result: str = "ok") -> None:
        self.errors = list(errors)
        self.result = result
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def test_temporary_errors_are_retried_until_success_and_each_is_reported() -> None:
    seen: list[StoreError] = []
    call = Script(TemporaryStoreError("slow", "SlowDown"), TemporaryStoreError("oops", "500"))
    assert FAST.call("put x", call, on_error=seen.append) == "ok"
    assert call.calls == 3
    assert [e.code for e in seen] == ["SlowDown", "500"]


def test_a_permanent_error_is_raised_at_once_and_reported() -> None:
    seen: list[StoreError] = []
    call = Script(PermanentStoreError("no such bucket", "NoSuchBucket"))
    with pytest.raises(PermanentStoreError):
        FAST.call("put x", call, on_error=seen.append)
    assert call.calls == 1
    assert [e.code for e in seen] == ["NoSuchBucket"]


def test_the_last_temporary_error_is_raised_once_the_deadline_has_passed() -> None:
    policy = RetryPolicy(base_delay=0.01, max_delay=0.02, deadline=0.05)
    call = Script(*(TemporaryStoreError(f"try {i}", "503") for i in range(10_000)))
    with pytest.raises(TemporaryStoreError) as raised:
        policy.call("put x", call)
    # It tried more than once, gave up long before running out of scripted errors, and the
    # error it raised is the one the last attempt got.
    assert 1 < call.calls < 10_000
    assert str(raised.value) == f"try {call.calls - 1}"


def test_a_stop_event_ends_the_retries_without_waiting_out_the_backoff() -> None:
    stop = threading.Event()
    stop.set()
    policy = RetryPolicy(base_delay=60.0, max_delay=60.0, deadline=3600.0)
    call = Script(TemporaryStoreError("slow", "SlowDown"))
    with pytest.raises(TemporaryStoreError):
        policy.call("put x", call, stop=stop)
    assert call.calls == 1


def test_other_exceptions_are_not_retried() -> None:
    call = Script(FileNotFoundError("gone"))
    with pytest.raises(FileNotFoundError):
        FAST.call("get x", call)
    assert call.calls == 1
