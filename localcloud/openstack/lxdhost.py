"""The LXD side of the harness's LXD compute host: its project, its bridge, the Debian base
image it boots (as an LXD unified tarball for Glance), and removing all of it again.

* project ``config.LXD_PROJECT`` (own images and profiles; its default profile has only the
  root disk: every server's NIC comes from its Neutron port);
* bridge ``config.LXD_BRIDGE`` (``LXD_GATEWAY``/24, NAT on): the Neutron subnet of the LXD
  project is this bridge's subnet. LXD's DHCP hands a container only the address pinned on its
  NIC (Neutron's fixed IP; LXD requires pinned addresses to lie inside its DHCP range, so the
  range covers Neutron's pool and nothing is ever leased dynamically);
* the Glance base image: the local-cloud base (``modelserve-base-debian12`` in the default
  project, exported read-only) + openssh-server, with cloud-init's network config enabled
  (the local base disables it and DHCPs eth0) and per-instance ssh host keys. Built once per
  (base fingerprint, recipe) into ``/var/cache/modelserve/openstack-base-<key>.tar.zst``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from localcloud.openstack import config
from localcloud.openstack.plugins.modelserve_os_plugins import lxdcli

log = logging.getLogger("openstack-harness")

BUILD_IP = "10.88.42.253"  # the build container's pinned address: outside Neutron's pool
RECIPE = r"""
set -eu
export DEBIAN_FRONTEND=noninteractive
cloud-init status --wait >/dev/null || true
for i in $(seq 60); do getent hosts deb.debian.org >/dev/null && break; sleep 1; done
apt-get update -q
apt-get install -y -q --no-install-recommends openssh-server
rm -f /etc/ssh/ssh_host_*
printf 'auto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n' \
  > /etc/network/interfaces
cat > /etc/cloud/cloud.cfg.d/90_modelserve.cfg <<'CFG'
# OpenStack base (localcloud/openstack/lxdhost.py): the NoCloud seed comes from Nova (the
# harness's LXD driver writes it), and so does the network: cloud-init renders it (ifupdown).
datasource_list: [NoCloud, None]
locale: C.UTF-8
ssh_genkeytypes: [ed25519, ecdsa, rsa]
ssh_deletekeys: true
# /etc/hosts names the hostname Nova gives (the LXD template wrote the container's name)
manage_etc_hosts: true
CFG
apt-get clean
rm -rf /var/lib/apt/lists/* /var/log/apt/* /var/log/*.log
cloud-init clean --logs
rm -rf /var/lib/cloud/seed/nocloud /var/lib/cloud/seed/nocloud-net/*
: > /etc/machine-id
"""


class LxdHostError(lxdcli.LxdError):
    """The LXD host cannot be set up; the message says why."""


def lxc(*args, check=True, timeout=900, input=None) -> subprocess.CompletedProcess:
    """`lxc ARGS` with the harness's private lxc config (lxdcli.run)."""
    return lxdcli.run(*args, check=check, timeout=timeout, input=input, env=_env(),
                      error=LxdHostError)


def query(path, method="GET", data=None, check=True, wait=False):
    """`lxc query` with the harness's private lxc config (lxdcli.query)."""
    return lxdcli.query(path, method, data, wait=wait, check=check, timeout=900, env=_env(),
                        error=LxdHostError)


def _env() -> dict:
    return dict(os.environ, LXD_CONF=str(conf_dir()))


def conf_dir() -> Path:
    d = config.Layout().state / "lxc-conf"
    d.mkdir(parents=True, exist_ok=True)
    return d


def usable() -> str | None:
    """None when the LXD host can be set up here, else why not."""
    if not shutil.which("lxc"):
        return "no lxc command"
    if lxc("query", "/1.0", check=False, timeout=30).returncode:
        return "LXD does not answer"
    if lxc("image", "info", config.LXD_BASE_ALIAS, "--project", "default",
           check=False, timeout=60).returncode:
        return f"no base image {config.LXD_BASE_ALIAS} (make the local cloud: localcloud/lxd/up.sh)"
    return None


def _p(path: str) -> str:
    return lxdcli.p(path, config.LXD_PROJECT)


def ensure_project_and_bridge() -> None:
    """The project (images, profiles of its own; default profile = root disk only) and the
    bridge; idempotent, a few calls when all is there."""
    proj = config.LXD_PROJECT
    if query(f"/1.0/projects/{proj}", check=False) is None:
        query("/1.0/projects", "POST", {
            "name": proj, "description": "modelserve OpenStack harness: LXD compute host",
            "config": {"features.images": "true", "features.profiles": "true",
                       "features.storage.volumes": "false", "features.networks": "false"}})
    profile = query(_p("/1.0/profiles/default"))
    root = {"type": "disk", "path": "/", "pool": config.LXD_POOL}
    if (profile.get("devices") or {}) != {"root": root}:
        query(_p("/1.0/profiles/default"), "PUT",
              {"description": "modelserve OpenStack LXD host", "config": {},
               "devices": {"root": root}})
    net = query(f"/1.0/networks/{config.LXD_BRIDGE}", check=False)
    prefix = config.LXD_CIDR.split("/")[1]
    base = config.LXD_GATEWAY.rsplit(".", 1)[0]
    want = {"ipv4.address": f"{config.LXD_GATEWAY}/{prefix}", "ipv4.nat": "true",
            "ipv6.address": "none", "ipv4.dhcp": "true",
            "ipv4.dhcp.ranges": f"{base}.10-{base}.254"}
    if net is None:
        _check_subnet_free()
        query("/1.0/networks", "POST", {"name": config.LXD_BRIDGE, "type": "bridge",
                                        "description": "modelserve OpenStack LXD host",
                                        "config": want})
    elif any((net.get("config") or {}).get(k) != v for k, v in want.items()):
        query(f"/1.0/networks/{config.LXD_BRIDGE}", "PATCH", {"config": want})


def _check_subnet_free() -> None:
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for net in (config.LXD_CIDR, config.LXD_FIP_CIDR):
        head = net.rsplit(".", 1)[0] + "."
        if any(line.startswith(head) for line in routes.splitlines()):
            raise LxdHostError(f"{net} clashes with a host route; set MODELSERVE_OS_LXD_* "
                               "(CIDR, GATEWAY, FIP_CIDR) to free /24s")


def base_key() -> tuple[str, str]:
    """(key, base image fingerprint): the tarball is rebuilt when either changes."""
    info = query(f"/1.0/images/aliases/{config.LXD_BASE_ALIAS}?project=default")
    fp = info["target"]
    return hashlib.sha256((fp + RECIPE).encode()).hexdigest()[:16], fp


def base_tarball() -> Path:
    """The Glance base image (LXD unified tarball), built once per key."""
    key, fp = base_key()
    return derived_tarball(fp, "default", key, "openstack-base",
                           "modelserve OpenStack base: Debian 12, cloud-init, openssh-server")


def derived_tarball(fp: str, source_project: str, key: str, prefix: str,
                    description: str) -> Path:
    """An LXD image of ``source_project`` (fingerprint ``fp``) + RECIPE (openssh-server,
    cloud-init networking from Nova), exported as a unified tarball for Glance; cached as
    ``<cache>/<prefix>-<key>.tar.zst``. The Glance base image is the local-cloud base made so."""
    out = config.Layout().cache / f"{prefix}-{key}.tar.zst"
    if out.exists():
        return out
    proj = ["--project", config.LXD_PROJECT]
    name = f"osbase-build-{key[:8]}"
    alias = f"osbase-{key}"
    lxc("delete", "--force", name, *proj, check=False)
    lxc("image", "delete", alias, *proj, check=False)
    log.info("building %s-%s from %s (project %s)", prefix, key, fp[:12], source_project)
    copied = query(_p(f"/1.0/images/{fp}"), check=False) is None
    if copied:
        # LXD 5.0.2: a relay copy reads the source in the *remote's* project (--project is
        # not honoured for the source), so copy through a conf whose remote is in it
        src_conf = conf_dir() / f"project-{source_project}"
        src_conf.mkdir(exist_ok=True)
        (src_conf / "config.yml").write_text(
            "default-remote: local\nremotes:\n  local:\n    addr: unix://\n    public: false\n"
            f"    project: {source_project}\naliases: {{}}\n")
        lxdcli.run("image", "copy", fp, "local:", "--target-project", config.LXD_PROJECT,
                   "--mode", "relay", timeout=1800, error=LxdHostError,
                   env=dict(os.environ, LXD_CONF=str(src_conf)))
    try:
        lxc("init", fp, name, *proj)
        lxc("config", "device", "add", name, "eth0", "nic", f"network={config.LXD_BRIDGE}",
            "name=eth0", f"ipv4.address={BUILD_IP}", *proj)
        lxc("start", name, *proj)
        lxc("exec", name, *proj, "--", "bash", "-c", RECIPE, timeout=900)
        lxc("stop", name, *proj, timeout=300)
        lxc("publish", name, "--alias", alias, *proj, f"description={description}",
            f"modelserve_base_key={key}", timeout=1800)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            lxc("image", "export", alias, f"{tmp}/image", *proj, timeout=1800)
            made = list(Path(tmp).iterdir())
            if len(made) != 1:
                raise LxdHostError(f"lxc image export gave {[p.name for p in made]}, "
                                   "not one unified tarball")
            os.replace(made[0], out)
    finally:
        lxc("delete", "--force", name, *proj, check=False)
        lxc("image", "delete", alias, *proj, check=False)
        if copied:
            lxc("image", "delete", fp, *proj, check=False)
    return out


def remove_project(proj: str) -> list[str]:
    """Delete an LXD project of ours with everything in it; returns what was removed."""
    removed: list[str] = []
    if query(f"/1.0/projects/{proj}", check=False) is None:
        return removed

    def names(kind):
        return [u.rsplit("/", 1)[-1].split("?")[0]
                for u in query(f"/1.0/{kind}?project={proj}") or []]

    for name in names("instances"):
        lxc("delete", "--force", name, "--project", proj, check=False)
        removed.append(f"instance {name}")
    for fp in names("images"):
        lxc("image", "delete", fp, "--project", proj, check=False)
        removed.append(f"image {fp[:12]}")
    for name in names("profiles"):
        if name != "default":
            lxc("profile", "delete", name, "--project", proj, check=False)
    lxc("project", "delete", proj)
    removed.append(f"project {proj}")
    return removed


def remove_all() -> list[str]:
    """Everything the harness (and its tests' bakes) made in LXD: the projects (instances,
    images, profiles), the bridge's forwards, the bridge. Returns what was removed."""
    removed = remove_project(config.LXD_PROJECT) + remove_project(config.LXD_PROJECT + "-bake")
    if query(f"/1.0/networks/{config.LXD_BRIDGE}", check=False) is not None:
        for fwd in query(f"/1.0/networks/{config.LXD_BRIDGE}/forwards") or []:
            addr = fwd.rsplit("/", 1)[-1]
            lxc("network", "forward", "delete", config.LXD_BRIDGE, addr, check=False)
            removed.append(f"forward {addr}")
        lxc("network", "delete", config.LXD_BRIDGE)
        removed.append(f"bridge {config.LXD_BRIDGE}")
    return removed
