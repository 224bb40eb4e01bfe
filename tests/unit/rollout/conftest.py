"""The CLI's post-switch analysis window defaults to 30 s: the unit tests of the CLI run with
it off (MODELSERVE_ANALYSIS_WINDOW=0) unless a test asks for one (``--analysis-window``)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_analysis_window_by_default(monkeypatch):
    monkeypatch.setenv("MODELSERVE_ANALYSIS_WINDOW", "0")
    monkeypatch.delenv("MODELSERVE_NOTIFY_URL", raising=False)
