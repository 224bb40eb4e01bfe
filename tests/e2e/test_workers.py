"""--workers N: worker-only instances whose seed points at their front's broker.

The front opens its broker to the bridge (MODELSERVE_BROKER_BIND=0.0.0.0) and each worker's
seed carries the front's address and the deploy's credentials; with the real image the
worker's Celery service runs and reaches that broker.
"""

from __future__ import annotations

import subprocess

import pytest

from rollout.health import fetch_version
from tests.e2e.lxdenv import images_mode
from tests.e2e.test_blue_green import instance_env

pytestmark = pytest.mark.e2e


def test_deploy_with_a_worker_instance(cloud, releases, new_env, rollout):
    a, _ = releases
    env = new_env("wk")
    res = rollout("deploy", "--env", env, "--release", a, "--workers", "1")
    assert res.rc == 0, res
    assert fetch_version(res.json["floating_ip"])["release"] == a
    insts = {i.role: i for i in cloud.list_instances(env)}
    assert set(insts) == {"front", "worker"}
    front, worker = insts["front"], insts["worker"]
    assert worker.deploy_id == front.deploy_id and worker.colour == front.colour

    _, fenv = instance_env(front.name)
    mode, wenv = instance_env(worker.name)
    assert mode == "600 root"
    assert fenv["MODELSERVE_BROKER_BIND"] == "0.0.0.0"
    assert wenv["MODELSERVE_ROLE"] == "worker"
    assert wenv["MODELSERVE_BROKER_URL"] == fenv["MODELSERVE_BROKER_URL"].replace(
        "@127.0.0.1:", f"@{front.address}:")
    assert wenv["MODELSERVE_RESULT_URL"] == fenv["MODELSERVE_RESULT_URL"].replace(
        "@127.0.0.1:", f"@{front.address}:")

    st = rollout("status", "--env", env)
    assert {(i["role"], i["live"]) for i in st.json["instances"]} == {("front", True),
                                                                        ("worker", True)}
    if images_mode() == "real":
        # the worker instance runs only the Celery worker, and it is connected to the front
        active = subprocess.run(["lxc", "exec", worker.name, "--", "systemctl", "is-active",
                                 "modelserve-worker", "modelserve-web"], capture_output=True,
                                text=True, check=False).stdout.split()
        assert active[0] == "active" and active[1] != "active", active
        conns = subprocess.run(["lxc", "exec", worker.name, "--", "sh", "-c",
                                "cat /proc/net/tcp"], capture_output=True, text=True,
                               check=True).stdout
        port_5672 = f"{5672:04X}"
        octets = front.address.split(".")
        front_hex = "".join(f"{int(o):02X}" for o in reversed(octets))
        assert f"{front_hex}:{port_5672}" in conns, "worker has no connection to the broker"
