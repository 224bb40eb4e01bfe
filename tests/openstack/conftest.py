"""A real OpenStack control plane for this tier, brought up by the harness (localcloud/openstack).

The session fixture runs `up` (idempotent: it reuses a running control plane) and, if this
session started it, `down` at the end. Every test works in its own rollout environment and
removes what it created, so tests do not depend on each other's leftovers.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest

from localcloud.openstack import config, seed
from localcloud.openstack.harness import Harness, HarnessError
from rollout.clouds.openstack import OpenStackCloud
from tests.openstack.osenv import ROOT, purge_env

pytestmark = pytest.mark.openstack


@pytest.fixture(scope="session")
def harness():
    """The control plane; started here (and stopped at the end) unless it already ran."""
    h = Harness()
    was_running = all(h.status().values())
    try:
        h.up()
    except HarnessError as exc:
        pytest.fail(f"the OpenStack harness did not come up: {exc}")
    yield h
    if not was_running and os.environ.get("MODELSERVE_OS_KEEP") != "1":
        h.down()


@pytest.fixture(scope="session")
def os_env(harness, tmp_path_factory):
    """Environment for `python -m rollout` and the SDK: clouds.yaml of the harness, and a
    private XDG cache (the CLI's token cache never lands in the user's ~/.cache)."""
    env = dict(os.environ)
    env.update({"OS_CLIENT_CONFIG_FILE": str(harness.layout.clouds_yaml),
                "OS_CLOUD": config.CLOUD, "PYTHONPATH": str(ROOT),
                "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("xdg-cache"))})
    # no post-switch analysis unless a test asks for it (test_progressive.py): the 30 s
    # default in every deploy would cost minutes, and a short window on a loaded machine
    # judges latency from a handful of probes
    env.setdefault("MODELSERVE_ANALYSIS_WINDOW", "0")
    for key in ("MODELSERVE_OS_FLAVOR", "MODELSERVE_OS_NETWORK"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="session")
def conn(harness):
    """The project's own connection (member role), as an operator has."""
    return seed.connect(harness)


@pytest.fixture(scope="session")
def admin(harness):
    """An admin connection (user_data, quotas, hypervisor state)."""
    return seed.connect(harness, admin=True)


@pytest.fixture(scope="session")
def bundle_meta():
    return json.loads((ROOT / "app/bundle/metadata.json").read_text())


@pytest.fixture(scope="session")
def releases(conn, bundle_meta):
    """Release images (A oldest, then B, C, …) with the real bundle's sha256 and accuracy.

    Five, not three: the fault matrix deploys a release with no server in its env each time,
    and a case that leaves an extra warm release behind must not exhaust the supply."""
    tag = secrets.token_hex(3)
    made = []
    for n, letter in enumerate("abcde"):
        rel = f"t{tag}-{letter}"
        img = _release_image(conn, bundle_meta, rel, f"2026-01-0{n + 1}T00:00:00Z")
        made.append((rel, img.id))
    yield [r for r, _ in made]
    for _, image_id in made:
        conn.image.delete_image(image_id, ignore_missing=True)


def _release_image(conn, bundle_meta, rel, built_at, provenance="release", **extra):
    """A stand-in disk with the real bundle's sha256 and accuracy as release properties."""
    return seed.upload_image(conn, rel, f"stand-in disk of {rel}".encode(), {
        "modelserve_model_sha256": bundle_meta["sha256"],
        "modelserve_model_accuracy": str(bundle_meta["metrics"]["accuracy"]),
        "modelserve_built_at": built_at,
        "modelserve_git_sha": "0" * 12, "modelserve_app_version": "test",
        "modelserve_provenance": provenance,
        "modelserve_accuracy_floor": str(bundle_meta["accuracy_floor"]),
        **extra,
    })


@pytest.fixture
def standin_release(conn, bundle_meta):
    """Make a stand-in release image with a behaviour (``fail N`` | ``slow N`` | ``flip``;
    ``modelserve_standin_behaviour``, honoured by the harness's ProcessDriver through
    localcloud/openstack/behave.py): ``standin_release("fail 8")`` -> its release name.
    The images are deleted after the test."""
    made = []

    def make(behaviour):
        rel = f"t{secrets.token_hex(3)}-{behaviour.split()[0]}"
        img = _release_image(conn, bundle_meta, rel, "2026-02-01T00:00:00Z", "standin",
                             modelserve_standin_behaviour=behaviour)
        made.append(img.id)
        return rel

    yield make
    for image_id in made:
        conn.image.delete_image(image_id, ignore_missing=True)


@pytest.fixture
def env_name(conn):
    """A fresh rollout environment, purged after the test."""
    name = f"t{secrets.token_hex(3)}"
    yield name
    purge_env(conn, name)


@pytest.fixture
def cloud(os_env, monkeypatch):
    """The provider, in-process, configured like the CLI would be."""
    for key in ("OS_CLIENT_CONFIG_FILE", "OS_CLOUD", "XDG_CACHE_HOME"):
        monkeypatch.setenv(key, os_env[key])
    return OpenStackCloud()


def pytest_collection_modifyitems(items):
    """Every test here is of the openstack tier. openstacksdk 4.22 warns about its own
    deprecations (InfluxDB, _compute_attributes) on every connect, not about our code;
    `filterwarnings = error` would turn those into failures."""
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().is_relative_to(here):
            item.add_marker(pytest.mark.openstack)
            for category in ("OpenStackDeprecationWarning", "RemovedInSDK50Warning",
                             "RemovedInSDK60Warning"):
                item.add_marker(pytest.mark.filterwarnings(
                    f"ignore::openstack.warnings.{category}"))
