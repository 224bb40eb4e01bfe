"""Keystone catalog and a seeded project, through the real APIs (openstacksdk), idempotently."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import openstack

from localcloud.openstack import config
from localcloud.openstack.config import HOST

PROJECT = "modelserve"
NETWORK = "modelserve-net"
SUBNET = "modelserve-subnet"
ROUTER = "modelserve-router"
SECGROUP = "modelserve"
KEYPAIR = "modelserve"
FLAVOR = "m1.small"
FLAVOR_HUGE = "m1.toobig"  # more RAM than the hypervisor has (within quota): servers go to ERROR
PUBLIC = "public"
STANDIN_RELEASE = "standin-0"
QUOTA_INSTANCES = 40
HUGE_RAM_MB = 256 * 1024  # the process driver's hypervisor has 32 GiB


def connect(harness, admin=False, project=PROJECT) -> openstack.connection.Connection:
    """A connection straight to the harness's Keystone (no clouds.yaml needed)."""
    pw = harness.layout.secrets()
    user, password, proj = (("admin", pw["admin"], "admin") if admin
                            else ("modelserve", pw["modelserve"], project))
    return openstack.connect(
        auth_url=f"http://{HOST}:{harness.ports.keystone}/v3", username=user,
        password=password, project_name=proj, user_domain_name="Default",
        project_domain_name="Default", region_name=config.REGION, identity_api_version="3",
        load_yaml_config=False, load_envvars=False,
        connect_retries=3)  # a pooled connection to a restarted service fails once


def register_services(harness) -> None:
    """Service project, users and catalog entries for Glance, Placement, Nova, Neutron."""
    conn = connect(harness, admin=True)
    idt = conn.identity
    pw = harness.layout.secrets()
    service = idt.find_project("service") or idt.create_project(
        name="service", domain_id="default")
    admin_role = idt.find_role("admin")
    service_role = idt.find_role("service") or idt.create_role(name="service")
    p = harness.ports
    catalog = {
        "glance": ("image", f"http://{HOST}:{p.glance}"),
        "placement": ("placement", f"http://{HOST}:{p.placement}"),
        "nova": ("compute", f"http://{HOST}:{p.nova}/v2.1"),
        "neutron": ("network", f"http://{HOST}:{p.neutron}"),
    }
    for name, (kind, url) in catalog.items():
        # created once: re-setting a password would revoke the tokens services hold
        user = idt.find_user(name, domain_id="default") or idt.create_user(
            name=name, password=pw["service"], domain_id="default")
        for role in (admin_role, service_role):
            idt.assign_project_role_to_user(service, user, role)
        svc = next(iter(idt.services(type=kind)), None) or idt.create_service(
            name=name, type=kind)
        have = {e.interface: e for e in idt.endpoints(service_id=svc.id)}
        for interface in ("public", "internal", "admin"):
            ep = have.get(interface)
            if ep is None:
                idt.create_endpoint(service_id=svc.id, interface=interface, url=url,
                                    region_id=config.REGION)
            elif ep.url != url:
                idt.update_endpoint(ep, url=url)


def _standin_image() -> bytes:
    """A small, deterministic stand-in for the baked disk image."""
    return b"modelserve stand-in image\n" + bytes(64 * 1024)


def seed_project(harness) -> dict:
    """The project a user would have: networks, router, security group, flavors, a keypair,
    and a Glance image carrying the modelserve release properties. Returns their ids."""
    admin = connect(harness, admin=True)
    idt = admin.identity
    pw = harness.layout.secrets()
    project = idt.find_project(PROJECT) or idt.create_project(
        name=PROJECT, domain_id="default", description="modelserve releases")
    user = idt.find_user("modelserve", domain_id="default") or idt.create_user(
        name="modelserve", password=pw["modelserve"], domain_id="default",
        default_project_id=project.id)
    member = idt.find_role("member")
    idt.assign_project_role_to_user(project, user, member)
    # room for several environments' blue + green (the fault tests lower it on purpose)
    admin.set_compute_quotas(project.id, instances=QUOTA_INSTANCES, cores=QUOTA_INSTANCES,
                             ram=2 * HUGE_RAM_MB)

    if admin.compute.find_flavor(FLAVOR) is None:
        admin.compute.create_flavor(name=FLAVOR, vcpus=1, ram=512, disk=1, is_public=True)
    huge = admin.compute.find_flavor(FLAVOR_HUGE)
    if huge is not None and huge.ram != HUGE_RAM_MB:
        admin.compute.delete_flavor(huge.id)
        huge = None
    if huge is None:
        admin.compute.create_flavor(name=FLAVOR_HUGE, vcpus=1, ram=HUGE_RAM_MB, disk=1,
                                    is_public=True)

    net = admin.network
    public = net.find_network(PUBLIC)
    if public is None:
        public = net.create_network(name=PUBLIC, is_router_external=True,
                                    provider_network_type="flat",
                                    provider_physical_network="public")
    if not list(net.subnets(network_id=public.id)):
        net.create_subnet(name="public-subnet", network_id=public.id, ip_version=4,
                          cidr=config.PUBLIC_CIDR, gateway_ip="127.43.0.1",
                          is_dhcp_enabled=False,
                          allocation_pools=[{"start": "127.43.0.10", "end": "127.43.0.250"}])

    conn = connect(harness)
    net = conn.network
    private = net.find_network(NETWORK) or net.create_network(name=NETWORK)
    subnet = net.find_subnet(SUBNET) or net.create_subnet(
        name=SUBNET, network_id=private.id, ip_version=4, cidr=config.PRIVATE_CIDR,
        gateway_ip="127.42.0.1", is_dhcp_enabled=False,
        allocation_pools=[{"start": "127.42.0.10", "end": "127.42.0.250"}])
    router = net.find_router(ROUTER)
    if router is None:
        router = net.create_router(name=ROUTER,
                                   external_gateway_info={"network_id": public.id})
    if not list(net.ports(device_id=router.id, network_id=private.id)):
        net.add_interface_to_router(router, subnet_id=subnet.id)
    sg = net.find_security_group(SECGROUP)
    if sg is None:
        sg = net.create_security_group(name=SECGROUP, description="modelserve web + ssh")
        for port in (8080, 22):
            net.create_security_group_rule(security_group_id=sg.id, direction="ingress",
                                           protocol="tcp", port_range_min=port,
                                           port_range_max=port, remote_ip_prefix="0.0.0.0/0",
                                           ethertype="IPv4")

    if conn.compute.find_keypair(KEYPAIR) is None:
        key = harness.layout.state / "modelserve-key"
        if not key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                            "modelserve-harness", "-f", str(key)], check=True)
        conn.compute.create_keypair(name=KEYPAIR,
                                    public_key=Path(f"{key}.pub").read_text().strip())

    image = upload_image(conn, STANDIN_RELEASE, _standin_image(),
                         {"modelserve_model_version": "standin",
                          "modelserve_accuracy": "0.0"})
    return {"project": project.id, "network": private.id, "subnet": subnet.id,
            "router": router.id, "security_group": sg.id, "image": image.id,
            "public": public.id}


def upload_image(conn, release: str, data: bytes, properties: dict | None = None,
                 name: str | None = None):
    """Find or upload the image of `release` (matched by its modelserve_release property)."""
    for image in conn.image.images():
        if (image.properties or {}).get("modelserve_release") == release:
            return image
    props = {"modelserve_release": release,
             "modelserve_model_sha256": hashlib.sha256(data).hexdigest()}
    props.update(properties or {})
    # data=, not filename=: the SDK leaves a file it opened itself unclosed
    return conn.image.create_image(
        name=name or f"modelserve-{release}", data=data, disk_format="raw",
        container_format="bare", visibility="private", wait=True, **props)
