"""--workers N: worker-only instances whose seed points at their front's broker.

The front opens its broker to this release's workers only: RabbitMQ listens TLS on 5671 and
Redis TLS on 6380 with a certificate of the deploy's own CA (plain AMQP on loopback only, no
plain Redis port), and an nftables table inside the front lets only the workers' fixed
addresses (and loopback) reach those ports. Each worker's seed carries the front's address,
the deploy's credentials and CA; with the real image the worker's Celery service reaches that
broker over amqps:// and rediss://.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from rollout.health import fetch_version
from tests.e2e.lxdenv import images_mode
from tests.e2e.standin import BASE, lxc
from tests.e2e.test_blue_green import instance_env

pytestmark = pytest.mark.e2e


def test_deploy_with_a_worker_instance(cloud, releases, new_env, rollout, tmp_path):
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
    assert fenv["MODELSERVE_BROKER_PEERS"] == worker.address  # fixed before the front's seed
    assert wenv["MODELSERVE_ROLE"] == "worker"
    assert wenv["MODELSERVE_BROKER_URL"] == fenv["MODELSERVE_BROKER_URL"].replace(
        "amqp://", "amqps://").replace("@127.0.0.1:5672/", f"@{front.address}:5671/")
    assert wenv["MODELSERVE_RESULT_URL"] == fenv["MODELSERVE_RESULT_URL"].replace(
        "@127.0.0.1:", f"@{front.address}:")
    assert wenv["MODELSERVE_RESULT_URL"].startswith("rediss://")
    assert wenv["MODELSERVE_TLS_CHECK_HOSTNAME"] == "1"
    # the TLS material: root-only where the seed wrote it; the key on the front alone
    assert file_mode(front.name, "/etc/modelserve/tls/server.key") == "600 root root"
    assert file_mode(worker.name, "/etc/modelserve/tls/ca.pem") == "600 root root"
    assert file_mode(worker.name, "/etc/modelserve/tls/server.key") == "missing"

    st = rollout("status", "--env", env)
    assert {(i["role"], i["live"]) for i in st.json["instances"]} == {("front", True),
                                                                        ("worker", True)}
    if images_mode() == "real":
        # the worker instance runs only the Celery worker, and it is connected to the front
        active = subprocess.run(["lxc", "exec", worker.name, "--", "systemctl", "is-active",
                                 "modelserve-worker", "modelserve-web"], capture_output=True,
                                text=True, check=False).stdout.split()
        assert active[0] == "active" and active[1] != "active", active
        for path, mode in (("/etc/rabbitmq/tls/server.key", "640 root rabbitmq"),
                           ("/etc/redis/tls/server.key", "640 root redis"),
                           ("/run/modelserve/ca.pem", "640 root modelserve")):
            assert file_mode(front.name, path) == mode, path

        # from the worker (a peer): TLS with the deploy's CA on 5671 and 6380; plain AMQP
        # is refused on the TLS port, and the plain ports do not accept at all
        assert probe(worker.name, front.address, 5671, "ca") == "tls", "AMQPS with the CA"
        assert probe(worker.name, front.address, 6380, "ca") == "tls", "Redis TLS with the CA"
        plain = probe(worker.name, front.address, 5671, "amqp")
        assert plain != "amqp", f"the broker answered plain AMQP on 5671: {plain}"
        for port in (5672, 6379):
            assert probe(worker.name, front.address, port, "tcp") == "closed", port

        # a container that is not part of the release, on the same bridge: nothing
        with outsider() as name:
            for port in (5671, 6380, 5672, 6379):
                assert probe(name, front.address, port, "tcp") == "closed", port
            # the same probe from the worker is open: the outsider is refused by address
            assert probe(worker.name, front.address, 5671, "tcp") == "open"

        # the floating IP forwards the app port alone. (A bare connect from the host proves
        # nothing: this machine's egress proxy accepts TCP to any routed address and answers
        # HTTP 400; the check is whether the service's own protocol answers.)
        fip = res.json["floating_ip"]
        for port, hello, answer in ((5672, b"AMQP\x00\x00\x09\x01", b"\x01\x00\x00"),
                                    (6379, b"PING\r\n", b"-NOAUTH")):
            through_fip = _answers(fip, port, hello)
            assert not through_fip.startswith(answer), f"floating IP {fip} forwards port {port}"
        ca = tmp_path / "ca.pem"  # a TLS answer counts only if it is the front's certificate
        ca.write_text(subprocess.run(["lxc", "exec", front.name, "--", "cat",
                                      "/run/modelserve/ca.pem"], capture_output=True,
                                     text=True, check=True).stdout)
        for port in (5671, 6380):
            assert not _tls_answers(fip, port, ca), f"floating IP {fip} forwards port {port}"
            # the host is on the bridge but no peer either
            assert not _tls_answers(front.address, port, ca), f"{port} answers the host"

        # predictions still go through the worker instance over TLS: the front's own worker
        # stopped, a prediction through the floating IP is answered (by the worker instance)
        subprocess.run(["lxc", "exec", front.name, "--", "systemctl", "stop",
                        "modelserve-worker"], check=True, capture_output=True)
        status, body = _predict(fip)
        assert status == 200, body
        assert len(body["predictions"]) == 1
        # ... over the worker's own connections to the front: AMQPS, and Redis TLS (which the
        # worker opens only when it stores a result: so not before a task of its own)
        conns = subprocess.run(["lxc", "exec", worker.name, "--", "sh", "-c",
                                "cat /proc/net/tcp"], capture_output=True, text=True,
                               check=True).stdout
        octets = front.address.split(".")
        front_hex = "".join(f"{int(o):02X}" for o in reversed(octets))
        for port in (5671, 6380):  # AMQPS and Redis TLS
            assert f"{front_hex}:{port:04X}" in conns, f"worker has no connection to {port}"


# runs inside a container (python3 of the base image): how host:port answers
_PROBE = r"""
import socket, ssl, sys
host, port, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    sock = socket.create_connection((host, port), timeout=4)
except OSError:
    print("closed"); sys.exit()
if how == "tcp":
    print("open"); sys.exit()
if how == "amqp":
    sock.settimeout(4); sock.sendall(b"AMQP\x00\x00\x09\x01")
    try:
        data = sock.recv(16)
    except OSError as exc:
        data = b""
    print("amqp" if data.startswith(b"\x01\x00\x00") else "no-amqp " + data.hex()); sys.exit()
ctx = ssl.create_default_context(cafile="/run/modelserve/ca.pem")  # checks the address too
try:
    with ctx.wrap_socket(sock, server_hostname=host):
        print("tls")
except (OSError, ssl.SSLError) as exc:
    print("tls-failed", exc)
"""


def probe(container: str, host: str, port: int, how: str) -> str:
    """From inside ``container``: ``closed`` (no TCP connection in 4 s), ``open`` (how=tcp),
    ``tls`` (a handshake verified against the deploy's CA and the address), ``amqp`` (a
    plain AMQP server answered)."""
    res = subprocess.run(["lxc", "exec", container, "--", "python3", "-c", _PROBE, host,
                          str(port), how], capture_output=True, text=True, check=False,
                         timeout=60)
    return (res.stdout.strip() or f"error {res.stderr.strip()[-300:]}").split("\n")[-1]


def file_mode(container: str, path: str) -> str:
    res = subprocess.run(["lxc", "exec", container, "--", "stat", "-c", "%a %U %G", path],
                         capture_output=True, text=True, check=False)
    return res.stdout.strip() if res.returncode == 0 else "missing"


@contextlib.contextmanager
def outsider():
    """A plain container from the base image, on the same bridge, in the test project: not
    part of any release."""
    name = f"ms-outsider-{secrets.token_hex(3)}"
    lxc("launch", BASE, name)
    try:
        deadline = time.monotonic() + 180
        while True:
            out = lxc("list", name, "-c", "4", "--format", "csv").strip()
            if out and "." in out:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"{name} got no IPv4 address in 180 s")
            time.sleep(1)
        yield name
    finally:
        lxc("delete", "--force", name, check=False)


def _predict(fip: str) -> tuple[int, dict]:
    row = {"npreg": 1, "glu": 89, "bp": 66, "skin": 23, "bmi": 28.1, "ped": 0.167, "age": 21}
    req = urllib.request.Request(f"http://{fip}:8080/api/v1/predictions",
                                 data=json.dumps({"instances": [row]}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")}


def _tls_answers(host: str, port: int, ca) -> bool:
    """True if host:port completes a TLS handshake with a certificate of the deploy's CA."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False  # the floating address is not in the certificate
    try:
        with socket.create_connection((host, port), timeout=3) as sock, \
                ctx.wrap_socket(sock) as tls:
            tls.settimeout(3)
            return True
    except (OSError, ssl.SSLError):
        return False


def _answers(host: str, port: int, hello: bytes) -> bytes:
    """What a service on host:port says to ``hello`` (b"" if nothing answers within 3 s)."""
    try:
        with socket.create_connection((host, port), timeout=3) as sock:
            sock.sendall(hello)
            return sock.recv(64)
    except OSError:
        return b""
