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
HUGE_RAM_MB = 256 * 1024  # more than the LXD host reports (this machine's RAM, or a share)


def _router_and_group(net, name, public, private, subnet):
    """The router ``name`` between ``public`` and ``private`` (its interface on ``subnet``),
    and the project's web + ssh security group; both idempotent: (router, group)."""
    router = net.find_router(name)
    if router is None:
        router = net.create_router(name=name, external_gateway_info={"network_id": public.id})
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
    return router, sg


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
    """The first project: the user ``modelserve``, networks, router, security group,
    flavors, a keypair, and a Glance image carrying the modelserve release properties; no
    compute host takes its servers (the LXD host is reserved to seed_lxd's project), so it
    serves the harness's checks of Keystone, Neutron and tenant isolation. Returns the ids."""
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
    router, sg = _router_and_group(net, ROUTER, public, private, subnet)

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


LXD_NETWORK = "modelserve-lxd-net"
LXD_SUBNET = "modelserve-lxd-subnet"
LXD_ROUTER = "modelserve-lxd-router"
LXD_PUBLIC = "public-lxd"
LXD_AGGREGATE = "lxd"
BASE_IMAGE = "debian-12-modelserve-base"
FLAVOR_LXD = "ms.lxd"  # room for the real image (TensorFlow front + worker)


def seed_lxd(harness, base_tarball: Path) -> dict:
    """The LXD host's project (config.LXD_PROJECT_OS): its servers, and only its, land on the
    LXD host (aggregate ``lxd``, availability zone ``lxd``, ``filter_tenant_id``); a network on
    the LXD bridge's subnet; an external network ``public-lxd`` (floating IPs = LXD network
    forwards) that only this project sees (RBAC access_as_external: the other project keeps
    exactly one external network); router, security group, the Debian base image in Glance
    (public, disk_format lxd). The user ``modelserve`` is a member, so its keypair works here."""
    admin = connect(harness, admin=True)
    idt = admin.identity
    project = idt.find_project(config.LXD_PROJECT_OS) or idt.create_project(
        name=config.LXD_PROJECT_OS, domain_id="default",
        description="modelserve on the LXD compute host")
    user = idt.find_user("modelserve", domain_id="default")
    idt.assign_project_role_to_user(project, user, idt.find_role("member"))
    admin.set_compute_quotas(project.id, instances=QUOTA_INSTANCES, cores=QUOTA_INSTANCES,
                             ram=2 * HUGE_RAM_MB)
    if admin.compute.find_flavor(FLAVOR_LXD) is None:
        admin.compute.create_flavor(name=FLAVOR_LXD, vcpus=2, ram=2048, disk=5, is_public=True)

    agg = next((a for a in admin.compute.aggregates() if a.name == LXD_AGGREGATE), None)
    if agg is None:
        agg = admin.compute.create_aggregate(name=LXD_AGGREGATE,
                                             availability_zone=config.LXD_AZ)
    if config.LXD_HOST not in (agg.hosts or []):
        agg = admin.compute.add_host_to_aggregate(agg, config.LXD_HOST)
    if (agg.metadata or {}).get("filter_tenant_id") != project.id:
        admin.compute.set_aggregate_metadata(agg, {"filter_tenant_id": project.id})

    net = admin.network
    public = net.find_network(LXD_PUBLIC)
    if public is None:
        public = net.create_network(name=LXD_PUBLIC, provider_network_type="flat",
                                    provider_physical_network="public-lxd")
    if not list(net.rbac_policies(object_id=public.id, action="access_as_external")):
        net.create_rbac_policy(object_type="network", object_id=public.id,
                               action="access_as_external", target_project_id=project.id)
    if not list(net.subnets(network_id=public.id)):
        fips = config.LXD_FIP_CIDR.rsplit(".", 1)[0]
        net.create_subnet(name="public-lxd-subnet", network_id=public.id, ip_version=4,
                          cidr=config.LXD_FIP_CIDR, gateway_ip=f"{fips}.1",
                          is_dhcp_enabled=False,
                          allocation_pools=[{"start": f"{fips}.10", "end": f"{fips}.250"}])

    conn = connect(harness, project=config.LXD_PROJECT_OS)
    net = conn.network
    base = config.LXD_GATEWAY.rsplit(".", 1)[0]
    private = net.find_network(LXD_NETWORK) or net.create_network(name=LXD_NETWORK)
    subnet = net.find_subnet(LXD_SUBNET) or net.create_subnet(
        name=LXD_SUBNET, network_id=private.id, ip_version=4, cidr=config.LXD_CIDR,
        gateway_ip=config.LXD_GATEWAY, is_dhcp_enabled=False,
        dns_nameservers=[config.LXD_GATEWAY],  # LXD's dnsmasq on the bridge
        allocation_pools=[{"start": f"{base}.10", "end": f"{base}.249"}])
    router, _ = _router_and_group(net, LXD_ROUTER, public, private, subnet)
    image = upload_base_image(admin, base_tarball)
    return {"project": project.id, "network": private.id, "subnet": subnet.id,
            "router": router.id, "public": public.id, "aggregate": agg.id, "image": image.id}


def rollout_env(harness) -> dict:
    """What `python -m rollout --cloud openstack` needs to deploy onto the LXD host: the
    clouds.yaml entry of its project, its external network and flavor."""
    return {"OS_CLIENT_CONFIG_FILE": str(harness.layout.clouds_yaml),
            "OS_CLOUD": config.CLOUD + "-lxd",
            "MODELSERVE_OS_EXTERNAL_NETWORK": LXD_PUBLIC,
            "MODELSERVE_OS_FLAVOR": FLAVOR_LXD}


def upload_base_image(admin, tarball: Path):
    """The Debian base (LXD unified tarball) as a public Glance image, once per build key."""
    key = tarball.name.removeprefix("openstack-base-").split(".")[0]
    for image in admin.image.images(name=BASE_IMAGE):
        if (image.properties or {}).get("modelserve_base_key") == key and \
                image.status == "active":
            return image
        admin.image.delete_image(image.id, ignore_missing=True)  # an older build
    with open(tarball, "rb") as fh:
        return admin.image.create_image(
            name=BASE_IMAGE, data=fh, disk_format=config.LXD_DISK_FORMAT,
            container_format="bare", visibility="public", wait=True,
            os_distro="debian", os_version="12", hypervisor_type="lxc",
            modelserve_base_key=key)
