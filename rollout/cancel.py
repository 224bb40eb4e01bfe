"""Cancellation by signal, whatever the inherited disposition (invariant I3).

``install()`` (called by the CLI at start) sets OUR handler for SIGINT, SIGTERM and SIGHUP,
so a process started with SIGINT ignored (CI shells' background jobs) is still cancellable.
The handler raises ``Cancelled`` in the main thread at once, unless a ``deferred()`` block is
running (undo, taking or releasing the lock): then the signal is remembered and, where the
block says so, raised when it ends. Exit status 128 + signal (130, 143, 129).
"""

from __future__ import annotations

import signal
import threading
from types import TracebackType

from rollout.errors import Cancelled

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_depth = 0
_pending: list[int] = []


def _handler(signum: int, frame) -> None:  # noqa: ARG001 - the signal API
    if _depth:
        _pending.append(signum)
        return
    raise Cancelled(signum)


def install() -> dict[int, object]:
    """Install the handlers (main thread only; elsewhere a no-op); returns the previous
    dispositions for ``restore``."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    _pending.clear()
    return {s: signal.signal(s, _handler) for s in SIGNALS}


def restore(previous: dict[int, object]) -> None:
    """Put back what ``install`` replaced."""
    for s, h in previous.items():
        signal.signal(s, h)  # type: ignore[arg-type]
    _pending.clear()


class deferred:  # noqa: N801 - used like a function: ``with deferred():``
    """Hold signals for the block (nesting allowed; main thread only).

    On leaving the outermost block normally with ``raise_pending`` a remembered signal is
    raised as ``Cancelled``; when an exception is already leaving the block (or
    ``raise_pending`` is False) it is dropped: the run is ending anyway, and the first error
    is the one reported."""

    def __init__(self, *, raise_pending: bool = True):
        self.raise_pending = raise_pending
        self.active = False

    def __enter__(self) -> deferred:
        global _depth
        if threading.current_thread() is threading.main_thread():
            _depth += 1
            self.active = True
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        global _depth
        if not self.active:
            return
        _depth -= 1
        if _depth or not _pending:
            return
        signum = _pending[0]
        _pending.clear()  # the run is ending either way: raised now, or already failing
        if et is None and self.raise_pending:
            raise Cancelled(signum)
