"""Wait for a condition instead of sleeping a fixed time: on a loaded machine anything may take
longer than usual, so a test waits (bounded, generously) for what it needs to have happened."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, *, interval: float = 0.2,
             detail: Callable[[], object] | None = None) -> T:
    """Call ``predicate`` every ``interval`` s until it returns something truthy, and return
    that. After ``timeout`` s: AssertionError "<what> did not happen within <timeout> s" (plus
    ``detail()``, e.g. the last answer or the logs, when given). An exception from the
    predicate propagates at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            message = f"{what} did not happen within {timeout:.0f} s"
            if detail is not None:
                message += f": {detail()}"
            raise AssertionError(message)
        time.sleep(interval)
