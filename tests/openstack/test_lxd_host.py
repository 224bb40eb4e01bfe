"""The LXD compute host (localcloud/openstack/plugins/modelserve_os_plugins/lxd_driver.py):
servers of project ``modelserve-lxd`` are LXD system containers booted from Glance, get
Nova's user_data/keypair/metadata through cloud-init and Neutron's fixed IP statically, and
their floating IPs are LXD network forwards."""

from __future__ import annotations

import base64
import json
import os
import secrets
import socket
import subprocess
import time

import pytest

from localcloud.openstack import config, seed

pytestmark = pytest.mark.openstack


@pytest.fixture
def conn(other_conn):
    """Here, the first project (the one the LXD host is not for)."""
    return other_conn
SEED = "/var/lib/cloud/seed/nocloud"


def lxc(*args, check=True, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "LXD_CONF"}
    proc = subprocess.run(["lxc", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)
    if check:
        assert proc.returncode == 0, f"lxc {args}: {proc.stderr}"
    return proc


def containers() -> dict[str, dict]:
    """name -> record of every instance in the LXD host's project."""
    out = lxc("query", f"/1.0/instances?recursion=1&project={config.LXD_PROJECT}").stdout
    return {i["name"]: i for i in json.loads(out)}


def forwards() -> dict[str, dict]:
    out = lxc("query", f"/1.0/networks/{config.LXD_BRIDGE}/forwards?recursion=1").stdout
    return {f["listen_address"]: f for f in json.loads(out)}


def banner(address, port=22, timeout=60) -> bytes:
    """The first bytes a TCP server at address:port sends (sshd: its version line)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((address, port), timeout=3) as s:
                s.settimeout(5)
                return s.recv(64)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def lxd_conn(harness):
    return seed.connect(harness, project=config.LXD_PROJECT_OS)


@pytest.fixture
def boot(lxd_conn, admin):
    """boot(user_data=..., **kw) -> (server, container name); deleted after the test."""
    made = []

    def _boot(user_data="#cloud-config\n{}\n", image=seed.BASE_IMAGE, wait=True, **kw):
        img = lxd_conn.image.find_image(image, ignore_missing=False)
        net = lxd_conn.network.find_network(seed.LXD_NETWORK, ignore_missing=False)
        flavor = lxd_conn.compute.find_flavor(kw.pop("flavor", seed.FLAVOR))
        server = lxd_conn.compute.create_server(
            name=f"lxd-{secrets.token_hex(3)}", image_id=img.id, flavor_id=flavor.id,
            networks=[{"uuid": net.id}], key_name=seed.KEYPAIR,
            user_data=base64.b64encode(user_data.encode()).decode(), **kw)
        made.append(server)
        if not wait:
            return server, None
        server = lxd_conn.compute.wait_for_server(server, wait=300)
        return server, admin.compute.get_server(server.id).instance_name

    yield _boot
    for server in made:
        lxd_conn.compute.delete_server(server.id, ignore_missing=True)
    for server in made:
        lxd_conn.compute.wait_for_delete(server, wait=120)


def fixed_ip(server) -> str:
    return next(a["addr"] for net in server.addresses.values() for a in net
                if a["version"] == 4)


def drop_cached_image(image_id) -> None:
    """The LXD host's import of a Glance image this test deleted (the driver also prunes
    unused ones in Nova's periodic image-cache pass)."""
    lxc("image", "delete", f"glance-{image_id}", "--project", config.LXD_PROJECT, check=False)


def in_container(name, *argv, timeout=300) -> str:
    return lxc("exec", "--project", config.LXD_PROJECT, name, "--", *argv,
               timeout=timeout).stdout


def test_the_lxd_host_is_real_and_reserved_to_its_project(admin, lxd_conn, conn):
    hyp = next(h for h in admin.compute.hypervisors(details=True)
               if h.name == config.LXD_HOST)
    with open("/proc/meminfo") as fh:
        mem_mb = int(fh.readline().split()[1]) // 1024
    assert hyp.hypervisor_type == "lxd" and hyp.status == "enabled"
    inventory = admin.placement.resource_provider_inventories(hyp.id)
    totals = {inv.resource_class: inv.total for inv in inventory}
    assert totals["VCPU"] == os.cpu_count() and totals["MEMORY_MB"] == mem_mb
    agg = next(a for a in admin.compute.aggregates() if a.name == seed.LXD_AGGREGATE)
    assert agg.availability_zone == config.LXD_AZ and agg.hosts == [config.LXD_HOST]
    assert agg.metadata["filter_tenant_id"] == lxd_conn.current_project_id
    base = lxd_conn.image.find_image(seed.BASE_IMAGE)
    assert (base.disk_format, base.container_format) == ("lxd", "bare")
    # the other project sees neither the LXD host's network nor its floating-IP pool
    assert [n.name for n in conn.network.networks(is_router_external=True)] == [seed.PUBLIC]
    assert conn.network.find_network(seed.LXD_NETWORK) is None


def test_server_boots_as_a_container_and_cloud_init_runs_novas_data(boot, lxd_conn):
    user_data = ("#cloud-config\nwrite_files:\n- path: /var/lib/probe\n"
                 "  content: written by user_data\n")
    before = set(containers())
    server, name = boot(user_data, metadata={"role": "probe"})
    assert server.status == "ACTIVE" and name in set(containers()) - before
    assert containers()[name]["status"] == "Running"
    status = in_container(name, "cloud-init", "status", "--wait", "--long")
    assert "status: done" in status and "seed=/var/lib/cloud/seed/nocloud" in status
    assert in_container(name, "cat", "/var/lib/probe") == "written by user_data"
    # the seed is root-only, and user_data is nowhere world-readable (the LXD templates' copy)
    assert in_container(name, "stat", "-c", "%a %U", f"{SEED}/user-data").split() == [
        "600", "root"]
    assert "written by user_data" not in in_container(
        name, "cat", "/var/lib/cloud/seed/nocloud-net/user-data")
    meta = json.loads(in_container(name, "cloud-init", "query", "ds.meta_data"))
    assert meta["instance-id"] == server.id and meta["meta"] == {"role": "probe"}
    assert in_container(name, "hostname").strip() == server.name
    key = lxd_conn.compute.get_keypair(seed.KEYPAIR).public_key.split()[1]
    assert key in in_container(name, "cat", "/home/debian/.ssh/authorized_keys")
    # Neutron's fixed IP, static (cloud-init's rendering), reachable from the host
    ip = fixed_ip(server)
    assert f"inet {ip}/24" in in_container(name, "ip", "-4", "addr", "show", "eth0")
    assert "inet static" in in_container(name, "cat", "/etc/network/interfaces.d/50-cloud-init")
    assert banner(ip).startswith(b"SSH-2.0-")


def test_power_actions_map_to_the_container_and_delete_removes_it(boot, lxd_conn):
    server, name = boot()
    lxd_conn.compute.stop_server(server)
    lxd_conn.compute.wait_for_server(server, status="SHUTOFF", wait=120)
    assert containers()[name]["status"] == "Stopped"
    lxd_conn.compute.start_server(server)
    lxd_conn.compute.wait_for_server(server, status="ACTIVE", wait=120)
    assert containers()[name]["status"] == "Running"
    in_container(name, "touch", "/run/before-reboot")  # /run is a tmpfs: a reboot empties it
    lxd_conn.compute.reboot_server(server, "HARD")
    deadline = time.monotonic() + 120
    while containers()[name]["status"] != "Running" or lxc(
            "exec", "--project", config.LXD_PROJECT, name, "--", "test", "-e",
            "/run/before-reboot", check=False).returncode == 0:
        assert time.monotonic() < deadline, "the container did not restart"
        time.sleep(1)
    lxd_conn.compute.wait_for_server(server, status="ACTIVE", wait=120)
    lxd_conn.compute.delete_server(server)
    lxd_conn.compute.wait_for_delete(server, wait=120)
    assert name not in containers()


def test_a_non_lxd_image_is_refused(boot, lxd_conn):
    conn_img = seed.upload_image(lxd_conn, f"raw-{secrets.token_hex(3)}", b"not a tarball")
    try:
        server, _ = boot(image=conn_img.id, wait=False)
        server = lxd_conn.compute.wait_for_server(server, status="ERROR", failures=[],
                                                  wait=300)
        assert "lxd" in (server.fault or {}).get("message", "") + json.dumps(server.fault)
    finally:
        lxd_conn.image.delete_image(conn_img.id, ignore_missing=True)
        drop_cached_image(conn_img.id)


def test_floating_ip_is_an_lxd_network_forward(boot, lxd_conn):
    server, name = boot()
    port = next(iter(lxd_conn.network.ports(device_id=server.id)))
    public = lxd_conn.network.find_network(seed.LXD_PUBLIC, ignore_missing=False)
    fip = lxd_conn.network.create_ip(floating_network_id=public.id, port_id=port.id)
    try:
        address = fip.floating_ip_address
        assert address in forwards()
        assert forwards()[address]["config"]["target_address"] == fixed_ip(server)
        assert banner(address).startswith(b"SSH-2.0-")
        lxd_conn.network.update_ip(fip.id, port_id=None)
        assert address not in forwards()
        lxd_conn.network.update_ip(fip.id, port_id=port.id)
        assert address in forwards()
        # deleting the server disassociates the floating IP: the forward goes with it
        lxd_conn.compute.delete_server(server)
        lxd_conn.compute.wait_for_delete(server, wait=120)
        assert address not in forwards()
    finally:
        lxd_conn.network.delete_ip(fip.id, ignore_missing=True)
    assert address not in forwards()


def test_snapshot_publishes_the_container_into_glance_and_boots_again(boot, lxd_conn):
    """What Packer's openstack builder does: snapshot a server into a new Glance image."""
    server, name = boot("#cloud-config\nwrite_files:\n- path: /etc/baked-here\n"
                        "  content: from the snapshot's source\n")
    in_container(name, "cloud-init", "status", "--wait")
    image = None
    try:
        image = lxd_conn.compute.create_server_image(server, f"snap-{secrets.token_hex(3)}",
                                                     wait=True, timeout=600)
        image = lxd_conn.image.get_image(image.id)
        assert image.status == "active" and image.size > 10 * 1024 * 1024
        assert (image.disk_format, image.container_format) == ("lxd", "bare")
        # the driver published the container as alias snap-<image id>, exported it and
        # dropped it (only this image's: a bake through Nova may be snapshotting meanwhile)
        assert not [i for i in json.loads(lxc("query", "/1.0/images?recursion=1&project="
                                               + config.LXD_PROJECT).stdout)
                    if any(a["name"] == f"snap-{image.id}" for a in i.get("aliases") or [])]
        clone, clone_name = boot(image=image.id)
        assert in_container(clone_name, "cat", "/etc/baked-here") == "from the snapshot's source"
        lxd_conn.compute.delete_server(clone)
        lxd_conn.compute.wait_for_delete(clone, wait=120)
    finally:
        if image is not None:
            lxd_conn.image.delete_image(image.id, ignore_missing=True)
            drop_cached_image(image.id)
