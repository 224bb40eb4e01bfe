"""The CLI's post-switch analysis window defaults to 30 s: the unit tests of the CLI run with
it off (MODELSERVE_ANALYSIS_WINDOW=0) unless a test asks for one (``--analysis-window``)."""

from __future__ import annotations

import pytest

from tests.unit.rollout.fakecloud import FakeCloud, fake_releases, free_port


@pytest.fixture(autouse=True)
def _no_analysis_window_by_default(monkeypatch):
    monkeypatch.setenv("MODELSERVE_ANALYSIS_WINDOW", "0")
    monkeypatch.delenv("MODELSERVE_NOTIFY_URL", raising=False)


@pytest.fixture
def fake_cloud():
    """``fake_cloud("abc")``: an in-memory cloud with those releases, closed after the test."""
    made: list[FakeCloud] = []

    def make(names: str = "ab") -> FakeCloud:
        made.append(FakeCloud(fake_releases(names), port=free_port()))
        return made[-1]

    yield make
    for c in made:
        c.close()
