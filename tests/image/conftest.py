"""Fixtures of the image tier: the real local LXD cloud, a real bake, containers booted from it.

Everything here is real (LXD, packer, cloud-init, systemd, RabbitMQ, Redis, the app); the tier
starts what it needs (localcloud/lxd/up.sh) and fails loudly when it cannot. Helpers live in
imgenv.py; everything is made in the test project (``modelserve-test``).
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from tests import lxd_guard
from tests.image.imgenv import (
    ROOT,
    Instance,
    bake,
    default_env,
    sh,
    sweep_stale,
    test_release_id,
    use_test_project,
)


@pytest.fixture(scope="session")
def host_tools() -> None:
    """packer, shellcheck, lxc… on the host (localcloud/lxd/up.sh --packages-only)."""
    proc = subprocess.run([str(ROOT / "localcloud" / "lxd" / "up.sh"), "--packages-only"], text=True,
                          capture_output=True, timeout=900, env=default_env())
    if proc.returncode != 0:
        pytest.fail(f"localcloud/lxd/up.sh --packages-only failed:\n{proc.stderr[-4000:]}")


@pytest.fixture(scope="session")
def local_cloud(host_tools) -> None:
    """The local LXD cloud (daemon, pool, bridge, base image): set up or fail loudly."""
    answered = lxd_guard.lxd_answers()
    proc = subprocess.run([str(ROOT / "localcloud" / "lxd" / "up.sh")], text=True,
                          capture_output=True, timeout=1200, env=default_env())
    if proc.returncode != 0:
        pytest.fail(f"localcloud/lxd/up.sh failed:\n{proc.stderr[-4000:]}")
    if not answered:
        lxd_guard.snapshot_after_startup()
    use_test_project()
    sweep_stale()


@pytest.fixture(scope="session")
def baked(local_cloud) -> dict:
    """One real bake of the current tree (deps layer reused when unchanged); deleted after."""
    release = test_release_id("rt")
    _, result = bake(release)
    yield result
    subprocess.run(["lxc", "image", "delete", result["fingerprint"]], capture_output=True)


@pytest.fixture
def launch(local_cloud):
    """launch(image, user_data) -> Instance; every container is deleted after the test."""
    names: list[str] = []

    def _launch(image: str, user_data: str) -> Instance:
        name = f"ms-imgtest-{uuid.uuid4().hex[:8]}"
        names.append(name)
        sh("lxc", "launch", image, name, "-c", f"cloud-init.user-data={user_data}")
        return Instance(name)

    yield _launch
    for name in names:
        subprocess.run(["lxc", "delete", "--force", name], capture_output=True)
