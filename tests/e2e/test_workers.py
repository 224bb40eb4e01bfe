"""--workers N: worker-only instances whose seed points at their front's broker.

The front opens its broker to the bridge (MODELSERVE_BROKER_BIND=0.0.0.0) and each worker's
seed carries the front's address and the deploy's credentials; with the real image the
worker's Celery service runs and reaches that broker.
"""

from __future__ import annotations

import socket
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

        # the front's broker and Redis answer on the bridge, for the worker, but the floating
        # IP forwards the app port alone. (A bare connect proves nothing here: this machine's
        # egress proxy accepts TCP to any routed address and answers HTTP 400; the check is
        # whether the service's own protocol answers.)
        fip = res.json["floating_ip"]
        for port, hello, answer in ((5672, b"AMQP\x00\x00\x09\x01", b"\x01\x00\x00"),
                                    (6379, b"PING\r\n", b"-NOAUTH")):
            assert _answers(front.address, port, hello).startswith(answer), (front.address, port)
            through_fip = _answers(fip, port, hello)
            assert not through_fip.startswith(answer), f"floating IP {fip} forwards port {port}"


def _answers(host: str, port: int, hello: bytes) -> bytes:
    """What a service on host:port says to ``hello`` (b"" if nothing answers within 3 s)."""
    try:
        with socket.create_connection((host, port), timeout=3) as sock:
            sock.sendall(hello)
            return sock.recv(64)
    except OSError:
        return b""
