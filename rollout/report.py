"""Progress lines on the console (stderr); the executor never prints itself."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Reporter:
    """Progress lines on the console given (stderr); None: silent (tests)."""

    def __init__(self, console=None):
        self.console = console

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        """Spinner while a step runs, then a ✓/✗ line with its duration."""
        t0 = time.monotonic()
        if self.console is None:
            yield
            return
        try:
            with self.console.status(text):
                yield
        except BaseException:
            self.console.print(f"[red]✗[/] {text} [dim]({time.monotonic() - t0:.1f}s)[/]")
            raise
        self.console.print(f"[green]✓[/] {text} [dim]({time.monotonic() - t0:.1f}s)[/]")

    def info(self, text: str) -> None:
        """An informational line."""
        if self.console is not None:
            self.console.print(f"  {text}", soft_wrap=True)

    def warn(self, text: str) -> None:
        """A warning line."""
        if self.console is not None:
            self.console.print(f"[yellow]![/] {text}", soft_wrap=True)
