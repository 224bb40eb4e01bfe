"""The harness itself: every service answers, the project is seeded, the SDK drives it."""

from __future__ import annotations

import os
import subprocess

import openstack
import pytest
from openstack import exceptions as os_exc

from localcloud.openstack import config, seed
from localcloud.openstack.procs import Procs

pytestmark = pytest.mark.openstack


@pytest.fixture
def conn(other_conn):
    """Here, the first project (no compute host: its Keystone and Neutron side)."""
    return other_conn


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


def test_sdk_scenario_a_floating_ip_moves_with_if_match(conn):
    """Point a floating IP at port A, re-point it to port B with If-Match, refuse a stale
    revision with 412, delete everything — through the real Neutron API (rollout's switch)."""
    net = conn.network.find_network(seed.NETWORK)
    public = conn.network.find_network(seed.PUBLIC)
    ports, ip = [], None
    try:
        ports = [conn.network.create_port(network_id=net.id, name=f"harness-{n}")
                 for n in ("a", "b")]
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
    finally:
        if ip is not None:
            conn.network.delete_ip(ip.id, ignore_missing=True)
        for port in ports:
            conn.network.delete_port(port.id, ignore_missing=True)
    assert not [p for p in conn.network.ports(network_id=net.id)
                if (p.name or "").startswith("harness-")]


def test_no_compute_host_takes_the_first_projects_servers(conn):
    """The LXD host is reserved to its project: a server of the first project finds no
    host (ERROR, "No valid host"), and is deleted again."""
    net = conn.network.find_network(seed.NETWORK)
    image = next(i for i in conn.image.images()
                 if (i.properties or {}).get("modelserve_release") == seed.STANDIN_RELEASE)
    server = conn.compute.create_server(
        name="harness-nohost", image_id=image.id,
        flavor_id=conn.compute.find_flavor(seed.FLAVOR).id, networks=[{"uuid": net.id}])
    try:
        server = conn.compute.wait_for_server(server, status="ERROR", failures=["ACTIVE"],
                                              wait=120)
        assert "No valid host" in (server.fault or {}).get("message", ""), server.fault
    finally:
        conn.compute.delete_server(server.id, ignore_missing=True)
        conn.compute.wait_for_delete(server, wait=120)


def test_stale_pid_files_are_ignored_and_removed(tmp_path):
    procs = Procs(tmp_path)
    (procs.run / "ghost.pid").write_text(f"{os.getpid()} 1\n")  # our pid, wrong start time
    (procs.run / "junk.pid").write_text("not a pid\n")
    assert procs.pid("ghost") is None and procs.pid("junk") is None
    assert not (procs.run / "ghost.pid").exists() and not (procs.run / "junk.pid").exists()
    pid = procs.start("sleeper", ["sleep", "30"])
    assert procs.pid("sleeper") == pid
    assert procs.stop("sleeper") and procs.pid("sleeper") is None
