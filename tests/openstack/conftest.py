"""A real OpenStack control plane for this tier, brought up by the harness (localcloud/openstack).

The session fixture runs `up` (idempotent: it reuses a running control plane) and, if this
session started it, `down` at the end. Every test works in its own rollout environment and
removes what it created, so tests do not depend on each other's leftovers.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from localcloud.openstack import config, seed
from localcloud.openstack.harness import Harness, HarnessError
from rollout.clouds.openstack import OpenStackCloud, env_tag

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
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
def os_env(harness):
    """Environment for `python -m rollout` and the SDK: clouds.yaml of the harness."""
    env = dict(os.environ)
    env.update({"OS_CLIENT_CONFIG_FILE": str(harness.layout.clouds_yaml),
                "OS_CLOUD": config.CLOUD, "PYTHONPATH": str(ROOT)})
    env.setdefault("MODELSERVE_ANALYSIS_WINDOW", "2")  # not the 30 s default in every deploy
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
        img = seed.upload_image(conn, rel, f"stand-in disk of {rel}".encode(), {
            "modelserve_model_sha256": bundle_meta["sha256"],
            "modelserve_model_accuracy": str(bundle_meta["metrics"]["accuracy"]),
            "modelserve_built_at": f"2026-01-0{n + 1}T00:00:00Z",
            "modelserve_git_sha": "0" * 12, "modelserve_app_version": "test",
            "modelserve_provenance": "release",
            "modelserve_accuracy_floor": str(bundle_meta["accuracy_floor"]),
        })
        made.append((rel, img.id))
    yield [r for r, _ in made]
    for _, image_id in made:
        conn.image.delete_image(image_id, ignore_missing=True)


def rollout(os_env, *args, env_name, extra_env=None, timeout=600):
    """`python -m rollout <cmd> --cloud openstack --env NAME ...`; returns CompletedProcess."""
    cmd, *rest = args
    env = dict(os_env, **(extra_env or {}))
    return subprocess.run([PY, "-m", "rollout", cmd, "--cloud", "openstack", "--env", env_name,
                           *rest], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc


def servers_of(conn, env_name):
    return list(conn.compute.servers(details=True, tags=env_tag(env_name)))


def live_servers(conn, env_name):
    """The env's servers that are not (yet) deleted: Nova lists DELETED ones for a while."""
    return [s for s in servers_of(conn, env_name) if s.status != "DELETED"]


def purge_env(conn, env_name):
    """Delete every server and the floating IP of one env (a test's own teardown)."""
    for server in servers_of(conn, env_name):
        conn.compute.delete_server(server.id, ignore_missing=True)
    for server in servers_of(conn, env_name):
        conn.compute.wait_for_delete(server, wait=120)
    for ip in conn.network.ips(tags=env_tag(env_name)):
        conn.network.delete_ip(ip.id, ignore_missing=True)


@pytest.fixture
def env_name(conn):
    """A fresh rollout environment, purged after the test."""
    name = f"t{secrets.token_hex(3)}"
    yield name
    purge_env(conn, name)


@pytest.fixture
def cloud(os_env, monkeypatch):
    """The provider, in-process, configured like the CLI would be."""
    for key in ("OS_CLIENT_CONFIG_FILE", "OS_CLOUD"):
        monkeypatch.setenv(key, os_env[key])
    return OpenStackCloud()


def fip_of(conn, env_name):
    ips = list(conn.network.ips(tags=env_tag(env_name)))
    assert len(ips) == 1, f"env {env_name} has {len(ips)} floating IPs"
    return ips[0]


def port_of(conn, server_id):
    ports = list(conn.network.ports(device_id=server_id))
    assert len(ports) == 1
    return ports[0]


def version_via(address, port=8080):
    import requests

    r = requests.get(f"http://{address}:{port}/version", timeout=5,
                     headers={"Connection": "close"})
    r.raise_for_status()
    return r.json()


def live_release(conn, env_name):
    """The release the floating IP really serves, asked through the floating IP itself."""
    fip = fip_of(conn, env_name)
    return version_via(fip.floating_ip_address)["release"]



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
