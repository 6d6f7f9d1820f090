"""``kill -USR1 <pid>``: where every thread and every asyncio task of a ``dcu`` process is.

A worker that stops making progress (a stage that published nothing for minutes) is a
bug to find, not a timeout to raise: the signal writes every thread's stack to stderr
(``faulthandler``, works even when a loop is blocked) and logs the stack of every task
of every registered event loop (the main loop and the stage actors' loop), ending with
``stack dump done``. The tests send it before reporting a task that did not finish.
"""

from __future__ import annotations

import asyncio
import faulthandler
import io
import logging
import signal
import sys
import threading

log = logging.getLogger(__name__)

DONE = "stack dump done"

_loops: dict[int, tuple[str, asyncio.AbstractEventLoop]] = {}
_lock = threading.Lock()


def register_loop(name: str, loop: asyncio.AbstractEventLoop) -> None:
    """Have ``loop``'s tasks dumped on SIGUSR1 (until it is closed)."""
    with _lock:
        _loops[id(loop)] = (name, loop)


def install() -> None:
    """On SIGUSR1: every thread's stack at once (``faulthandler``, in C, so even a blocked
    interpreter answers), then every registered loop's tasks. Call from the main thread."""
    signal.signal(signal.SIGUSR1, _on_signal)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=True)


def _on_signal(signum: int, frame: object) -> None:
    dump_tasks()


def dump_tasks() -> None:
    """Log the tasks of every registered loop (each on its own loop), then ``DONE``."""
    with _lock:
        loops = list(_loops.values())
    for name, loop in loops:
        if not loop.is_closed():
            loop.call_soon_threadsafe(_log_tasks, name, loop)
    log.warning(DONE)


def _log_tasks(name: str, loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    out = io.StringIO()
    for task in tasks:
        task.print_stack(limit=20, file=out)
    log.warning("%d asyncio task(s) on loop %s:\n%s", len(tasks), name, out.getvalue())
