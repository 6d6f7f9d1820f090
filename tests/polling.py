"""Waiting for a condition in tests: one helper, in a sync and an async form.

``wait_until`` (threads, subprocesses, blocking clients) and ``eventually`` (coroutines)
call ``check`` until its value is truthy (or satisfies ``until``) and return that value.
When the deadline passes they raise an ``AssertionError`` (or the ``error`` type given)
that names what was awaited, for how long, the last value ``check`` returned (or the last
exception it raised, when ``retry`` lets it) and, with ``describe``, whatever else helps
(a log tail, a stack dump). A condition is always polled: never replace one with a fixed
sleep.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


def _timed_out(
    what: str,
    timeout: float,
    last: object,
    error: type[Exception],
    describe: Callable[[], str] | None,
) -> Exception:
    if isinstance(last, BaseException):
        seen = f"it raised {last!r}"
    else:
        seen = repr(last)
        if len(seen) > 2000:
            seen = seen[:2000] + "..."
    message = f"timed out after {timeout:g}s waiting for {what}; last seen: {seen}"
    if describe is not None:
        message += f"\n{describe()}"
    return error(message)


def wait_until(
    check: Callable[[], T],
    *,
    timeout: float,
    what: str,
    until: Callable[[T], object] = bool,
    interval: float = 0.05,
    retry: tuple[type[BaseException], ...] = (),
    error: type[Exception] = AssertionError,
    describe: Callable[[], str] | None = None,
) -> T:
    """Call ``check`` every ``interval`` seconds until ``until(value)`` holds (by default:
    until the value is truthy), and return that value. An exception of a ``retry`` type
    counts as "not yet"; any other propagates at once (a ``check`` may raise to give up
    early, e.g. when the process it waits for has died)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = check()
        except retry as exc:
            last = exc
        else:
            if until(result):
                return result
            last = result
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last, error, describe)
        time.sleep(interval)


async def eventually(
    check: Callable[[], Awaitable[T]] | Callable[[], T],
    *,
    timeout: float = 15.0,
    what: str = "condition",
    until: Callable[[T], object] = bool,
    interval: float = 0.05,
    retry: tuple[type[BaseException], ...] = (),
    describe: Callable[[], str] | None = None,
) -> T:
    """``wait_until`` for a coroutine: ``check`` may return a value or an awaitable of
    one; the wait yields to the event loop between calls."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result: Any = check()
            if inspect.isawaitable(result):
                result = await result
        except retry as exc:
            last = exc
        else:
            if until(result):
                return result  # type: ignore[no-any-return]
            last = result
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, last, AssertionError, describe)
        await asyncio.sleep(interval)
