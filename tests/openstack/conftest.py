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
from tests.openstack import standins
from tests.openstack.bakes import BakeChain
from tests.openstack.osenv import ROOT, purge_env, use_cloud_env

BAKE_PROJECT = config.LXD_PROJECT + "-bake"
# modules in the order they run: the bakes through Nova go on in the background meanwhile
# (bakes.py), so the cases that need them come late, and the ones that break Nova, Neutron
# or the quota on purpose come last, once no bake is running
LATE = ("test_lxd_release.py", "test_faults.py")

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
    env.update(seed.rollout_env(harness), PYTHONPATH=str(ROOT),
               XDG_CACHE_HOME=str(tmp_path_factory.mktemp("xdg-cache")))
    # no post-switch analysis unless a test asks for it (test_progressive.py): the 30 s
    # default in every deploy would cost minutes, and a short window on a loaded machine
    # judges latency from a handful of probes
    env.setdefault("MODELSERVE_ANALYSIS_WINDOW", "0")
    env.pop("MODELSERVE_OS_NETWORK", None)
    return env


@pytest.fixture(scope="session")
def conn(harness):
    """The connection of the project whose servers are LXD containers (member role), as an
    operator has: the rollout cases deploy there."""
    return seed.connect(harness, project=config.LXD_PROJECT_OS)


@pytest.fixture(scope="session")
def other_conn(harness):
    """The first project's connection: a tenant with no compute host (the harness's checks
    of Keystone, Neutron and tenant isolation)."""
    return seed.connect(harness)


@pytest.fixture(scope="session")
def admin(harness):
    """An admin connection (user_data, quotas, hypervisor state)."""
    return seed.connect(harness, admin=True)


@pytest.fixture(scope="session")
def lxd_conn(harness):
    """The connection of the LXD compute host's project (where the bakes go)."""
    return seed.connect(harness, project=config.LXD_PROJECT_OS)


@pytest.fixture(scope="session")
def bake_env(os_env):
    """bake.py's environment: the LXD project of the suite (never the default one) and the
    harness's LXD project on OpenStack."""
    project = os.environ.get("MODELSERVE_LXD_PROJECT") or BAKE_PROJECT
    assert project != "default", "the suite never bakes into the default project"
    env = dict(os_env, OS_CLOUD=config.CLOUD + "-lxd", MODELSERVE_LXD_PROJECT=project)
    env.pop("LXD_CONF", None)
    yield env
    if project == BAKE_PROJECT:
        from localcloud.openstack import lxdhost

        lxdhost.remove_project(BAKE_PROJECT)


@pytest.fixture(scope="session")
def os_bakes(lxd_conn, bake_env):
    """The deps layer and releases a, b baked by Packer through Nova, in the background
    (tests/openstack/bakes.py); the release images are deleted at the end, the deps layer
    kept (a cache keyed by what it is made of, like the LXD tier's)."""
    from tests.openstack.test_lxd_host import drop_cached_image

    chain = BakeChain(bake_env, lxd_conn).start()
    yield chain
    chain.stop()
    print(f"openstack bakes through Nova (s): {chain.seconds}")
    for image_id in chain.release_images():
        lxd_conn.image.delete_image(image_id, ignore_missing=True)
        drop_cached_image(image_id)


@pytest.fixture(scope="session", autouse=True)
def _bakes_from_the_start(request):
    """Start the bakes with the tier's first case when any collected case needs them."""
    if request.config.stash.get(_NEEDS_BAKES, False):
        request.getfixturevalue("os_bakes")


_NEEDS_BAKES = pytest.StashKey[bool]()


@pytest.fixture(scope="session")
def bundle_meta():
    return json.loads((ROOT / "app/bundle/metadata.json").read_text())


@pytest.fixture(scope="session")
def releases(conn, bundle_meta):
    """Stand-in releases (A oldest, then B, C, …): Glance images that boot as real servers
    on the LXD host (tests/openstack/standins.py), each serving a model sha256 of its own.

    Five, not three: the fault matrix deploys a release with no server in its env each time,
    and a case that leaves an extra warm release behind must not exhaust the supply."""
    tag = secrets.token_hex(3)
    made = []
    try:
        for n, letter in enumerate("abcde"):
            rel = f"t{tag}-{letter}"
            img = standins.upload(conn, rel, letter,
                                  _release_props(bundle_meta, f"2026-01-0{n + 1}T00:00:00Z"))
            made.append((rel, img.id))
        yield [r for r, _ in made]
    finally:
        for _, image_id in made:
            standins.delete(conn, image_id)


def _release_props(bundle_meta, built_at):
    return {"modelserve_model_accuracy": str(bundle_meta["metrics"]["accuracy"]),
            "modelserve_built_at": built_at, "modelserve_git_sha": "0" * 12,
            "modelserve_app_version": "test",
            "modelserve_accuracy_floor": str(bundle_meta["accuracy_floor"])}


@pytest.fixture
def standin_release(conn, bundle_meta):
    """Make a stand-in release whose image misbehaves (``fail N`` | ``slow N`` | ``flip``,
    baked into it: tests/openstack/standins.py): ``standin_release("fail 8")`` -> its release
    name. The images are deleted after the test."""
    made = []

    def make(behaviour):
        rel = f"t{secrets.token_hex(3)}-{behaviour.split()[0]}"
        img = standins.upload(conn, rel, behaviour,
                              _release_props(bundle_meta, "2026-02-01T00:00:00Z"))
        made.append(img.id)
        return rel

    yield make
    for image_id in made:
        standins.delete(conn, image_id)


@pytest.fixture
def env_name(conn):
    """A fresh rollout environment, purged after the test."""
    name = f"t{secrets.token_hex(3)}"
    yield name
    purge_env(conn, name)


@pytest.fixture
def cloud(os_env, monkeypatch):
    """The provider, in-process, configured like the CLI would be."""
    use_cloud_env(os_env, monkeypatch)
    return OpenStackCloud()


def pytest_collection_modifyitems(config, items):
    """Every test here is of the openstack tier, the LATE modules run last (in that order),
    and the bakes start early when a case needs them. openstacksdk 4.22 warns about its own
    deprecations (InfluxDB, _compute_attributes) on every connect, not about our code;
    `filterwarnings = error` would turn those into failures."""
    here = Path(__file__).resolve().parent
    ours = [i for i in items if Path(str(i.fspath)).resolve().is_relative_to(here)]

    def late(item) -> int:
        name = Path(str(item.fspath)).name
        return LATE.index(name) + 1 if name in LATE else 0

    if ours:
        # a stable sort of this tier's cases, in the places they held (other tiers untouched)
        ids = {id(i) for i in ours}
        places = [n for n, i in enumerate(items) if id(i) in ids]
        for n, item in zip(places, sorted(ours, key=late), strict=True):
            items[n] = item
    config.stash[_NEEDS_BAKES] = any(
        {"os_deps", "os_releases", "os_bakes"} & set(getattr(i, "fixturenames", ()))
        for i in ours)
    for item in ours:
        item.add_marker(pytest.mark.openstack)
        for category in ("OpenStackDeprecationWarning", "RemovedInSDK50Warning",
                         "RemovedInSDK60Warning"):
            item.add_marker(pytest.mark.filterwarnings(
                f"ignore::openstack.warnings.{category}"))
