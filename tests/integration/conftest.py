"""Fixtures of the integration tier (the stack itself: tests/integration/stack.py)."""

from __future__ import annotations

import pytest

from tests.integration.stack import build_stack, teardown_stack


@pytest.fixture(scope="module")
def stack():
    s = build_stack()
    try:
        yield s
    finally:
        teardown_stack(s)
