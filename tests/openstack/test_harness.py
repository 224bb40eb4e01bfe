"""The harness itself: every service answers, the project is seeded, the SDK drives it."""

from __future__ import annotations

import base64
import os
import subprocess
import time

import openstack
import pytest
import requests
from openstack import exceptions as os_exc

from localcloud.openstack import config, seed
from localcloud.openstack.procs import Procs

pytestmark = pytest.mark.openstack


def test_every_daemon_runs_and_up_is_idempotent(harness):
    before = harness.status()
    assert all(before.values()), f"not running: {[n for n, p in before.items() if not p]}"
    harness.up()  # a second `up` reuses everything
    assert harness.status() == before


def test_everything_listens_on_loopback_only(harness):
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    ours = {pid for pid in harness.status().values() if pid}
    for line in out.splitlines():
        if any(f"pid={pid}," in line for pid in ours):
            local = line.split()[3]
            assert local.startswith(("127.", "[::1]")), f"listens beyond loopback: {line}"


def test_clouds_yaml_works_for_the_sdk(harness, monkeypatch):
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(harness.layout.clouds_yaml))
    conn = openstack.connect(cloud=config.CLOUD)
    assert conn.current_project.name == seed.PROJECT
    catalog = {s["type"] for s in conn.service_catalog}
    assert {"identity", "image", "compute", "network", "placement"} <= catalog


def test_the_project_is_seeded(conn, admin):
    net = conn.network.find_network(seed.NETWORK)
    subnet = conn.network.find_subnet(seed.SUBNET)
    assert net and subnet and subnet.cidr == config.PRIVATE_CIDR
    public = conn.network.find_network(seed.PUBLIC)
    assert public.is_router_external
    router = conn.network.find_router(seed.ROUTER)
    assert router.external_gateway_info["network_id"] == public.id
    assert list(conn.network.ports(device_id=router.id, network_id=net.id))
    sg = conn.network.find_security_group(seed.SECGROUP)
    assert {(r["port_range_min"], r["direction"]) for r in sg.security_group_rules
            if r["protocol"] == "tcp"} == {(8080, "ingress"), (22, "ingress")}
    assert conn.compute.find_flavor(seed.FLAVOR).vcpus == 1
    assert conn.compute.find_keypair(seed.KEYPAIR) is not None
    image = next(i for i in conn.image.images()
                 if (i.properties or {}).get("modelserve_release") == seed.STANDIN_RELEASE)
    assert image.status == "active"
    assert len(image.properties["modelserve_model_sha256"]) == 64
    hypervisors = list(admin.compute.hypervisors(details=True))
    assert hypervisors and hypervisors[0].status == "enabled"


def test_sdk_scenario_two_servers_and_a_floating_ip(conn, admin):
    """Boot two servers, point a floating IP at A, re-point it to B with If-Match, refuse a
    stale revision with 412, delete everything — through the real APIs."""
    net = conn.network.find_network(seed.NETWORK)
    image = next(i for i in conn.image.images()
                 if (i.properties or {}).get("modelserve_release") == seed.STANDIN_RELEASE)
    flavor = conn.compute.find_flavor(seed.FLAVOR)
    servers, ip = [], None
    try:
        for name in ("sdk-a", "sdk-b"):
            servers.append(conn.compute.create_server(
                name=f"harness-{name}", image_id=image.id, flavor_id=flavor.id,
                networks=[{"uuid": net.id}], tags=["harness-test"],
                user_data=base64.b64encode(b"#cloud-config\n{}\n").decode()))
        servers = [conn.compute.wait_for_server(s, wait=120) for s in servers]
        ports = [next(iter(conn.network.ports(device_id=s.id))) for s in servers]
        assert all(p.status == "ACTIVE" and p.binding_vif_type != "binding_failed"
                   for p in ports)
        public = conn.network.find_network(seed.PUBLIC)
        ip = conn.network.create_ip(floating_network_id=public.id, port_id=ports[0].id)
        assert ip.floating_ip_address.startswith("127.43.0.")
        assert conn.network.get_ip(ip.id).status == "ACTIVE"
        stale = ip.revision_number
        ip = conn.network.update_ip(ip.id, port_id=ports[1].id, if_revision=stale)
        assert ip.port_id == ports[1].id and ip.fixed_ip_address == ports[1].fixed_ips[0][
            "ip_address"]
        with pytest.raises(os_exc.HttpException) as err:
            # by id: a resource object that already carried this If-Match does not resend it
            conn.network.update_ip(ip.id, port_id=ports[0].id, if_revision=stale)
        assert err.value.status_code == 412
        assert conn.network.get_ip(ip.id).port_id == ports[1].id
        user_data = admin.compute.get_server(servers[0].id).user_data
        assert base64.b64decode(user_data).startswith(b"#cloud-config")
    finally:
        if ip is not None:
            conn.network.delete_ip(ip.id, ignore_missing=True)
        for s in servers:
            conn.compute.delete_server(s.id, ignore_missing=True)
        for s in servers:
            conn.compute.wait_for_delete(s, wait=120)
    assert not [s for s in conn.compute.servers(tags="harness-test")]


def test_floating_ip_forwards_to_the_associated_fixed_ip(conn, harness, tmp_path):
    """The forwarder follows Neutron: a listener on a fixed IP answers via the floating IP."""
    import http.server
    import threading

    net = conn.network.find_network(seed.NETWORK)
    public = conn.network.find_network(seed.PUBLIC)
    port = conn.network.create_port(network_id=net.id, name="harness-fwd")
    fixed = port.fixed_ips[0]["ip_address"]

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            body = f"hello from {fixed}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer((fixed, 8080), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ip = None
    try:
        ip = conn.network.create_ip(floating_network_id=public.id, port_id=port.id)
        deadline = time.monotonic() + 10
        while True:
            try:
                r = requests.get(f"http://{ip.floating_ip_address}:8080/", timeout=2)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert r.text == f"hello from {fixed}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        if ip is not None:
            conn.network.delete_ip(ip.id, ignore_missing=True)
        conn.network.delete_port(port.id, ignore_missing=True)


def test_stale_pid_files_are_ignored_and_removed(tmp_path):
    procs = Procs(tmp_path)
    (procs.run / "ghost.pid").write_text(f"{os.getpid()} 1\n")  # our pid, wrong start time
    (procs.run / "junk.pid").write_text("not a pid\n")
    assert procs.pid("ghost") is None and procs.pid("junk") is None
    assert not (procs.run / "ghost.pid").exists() and not (procs.run / "junk.pid").exists()
    pid = procs.start("sleeper", ["sleep", "30"])
    assert procs.pid("sleeper") == pid
    assert procs.stop("sleeper") and procs.pid("sleeper") is None
