"""Fixtures of the e2e tier (helpers live in tests/e2e/lxdenv.py)."""

from __future__ import annotations

import os

import pytest

from tests.e2e import lxdenv
from tests.e2e.lxdenv import Background, destroy_env, new_env_name, run_rollout


@pytest.fixture(scope="session", autouse=True)
def _short_analysis_window():
    """No ``rollout`` run this tier spawns runs the post-switch analysis (not the 30 s
    default, and no short window that judges latency from a handful of probes on a loaded
    machine) unless it asks: test_analysis.py and test_preview.py pass ``--analysis-window``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MODELSERVE_ANALYSIS_WINDOW", os.environ.get("MODELSERVE_ANALYSIS_WINDOW", "0"))
        yield


@pytest.fixture(scope="session")
def cloud():
    """The local LXD cloud, in the test project."""
    return lxdenv.open_lxd()


@pytest.fixture(scope="session")
def releases(cloud) -> tuple[str, str]:
    return lxdenv.release_pair()


@pytest.fixture
def new_env(cloud):
    """A fresh env name per test, destroyed afterwards (whatever the test left)."""
    made = []

    def make(prefix: str = "t") -> str:
        env = new_env_name(prefix)
        made.append(env)
        return env

    yield make
    for env in made:
        destroy_env(cloud, env)


@pytest.fixture
def background():
    """background(*args, pause=..., sigint_ignored=...) -> Background; closed after."""
    runs: list[Background] = []

    def start(*args: str, **kw) -> Background:
        run = Background(*args, **kw)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


@pytest.fixture
def rollout():
    return run_rollout
