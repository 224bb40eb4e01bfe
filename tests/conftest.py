"""Shared test helpers: the committed bundle and valid rows built from its held-out sample.

``tests.lxd_guard``: every LXD test works in the project ``modelserve-test``, and the session
fails if the user's default LXD project changed (see that module).
"""

from __future__ import annotations

import pytest

from app.bundle import load_bundle

pytest_plugins = ["tests.lxd_guard"]


@pytest.fixture(scope="session")
def bundle():
    return load_bundle()


@pytest.fixture(scope="session")
def holdout(bundle):
    """(instances, probabilities) of the bundle's whole held-out sample."""
    sample = bundle.metadata["holdout_sample"]
    return [s["features"] for s in sample], [s["probability"] for s in sample]
