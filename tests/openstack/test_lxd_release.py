"""The real modelserve image, booted through Nova on the LXD host: baked by packer/bake.py (LXD
builder, into a private LXD project), exported as an LXD unified tarball, uploaded to Glance
with its ``modelserve_*`` properties, then deployed by `python -m rollout deploy --cloud
openstack` into project ``modelserve-lxd``. cloud-init runs rollout's NoCloud seed from Nova's
user_data; the health gate, the prediction check and /version go through the image's own
services and the floating IP (an LXD network forward)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from localcloud.openstack import config, seed
from tests.openstack.osenv import ROOT, fip_of, live_release, ok, purge_env, rollout
from tests.openstack.test_lxd_host import containers, drop_cached_image, forwards

pytestmark = pytest.mark.openstack

BAKE_PROJECT = config.LXD_PROJECT + "-bake"


def _lxc(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "LXD_CONF"}
    proc = subprocess.run(["lxc", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, f"lxc {args[:4]}: {proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def lxd_conn(harness):
    if not harness.lxd:
        pytest.skip("the harness runs no LXD compute host (MODELSERVE_OS_LXD)")
    return seed.connect(harness, project=config.LXD_PROJECT_OS)


@pytest.fixture(scope="module")
def lxd_release(lxd_conn):
    """(release, Glance image id): one real bake of the tree, in Glance as disk_format lxd.
    Baked in the suite's LXD project (tests/lxd_guard.py), where the image tier's
    dependencies layer is reused; the release image is deleted afterwards."""
    release = f"osl-{time.strftime('%m%d%H%M', time.gmtime())}-{secrets.token_hex(2)}"
    project = os.environ.get("MODELSERVE_LXD_PROJECT") or BAKE_PROJECT
    assert project != "default", "the suite never bakes into the default project"
    env = dict(os.environ, MODELSERVE_LXD_PROJECT=project)
    env.pop("LXD_CONF", None)
    image_id = fingerprint = None
    try:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, str(ROOT / "packer/bake.py"), "--release",
                               release, "--json", "--env", "ci", "--allow-dirty"],
                              capture_output=True, text=True, timeout=3000, env=env)
        assert proc.returncode == 0, f"bake failed:\n{proc.stderr[-5000:]}"
        baked = time.monotonic() - t0
        fingerprint = json.loads(proc.stdout)["fingerprint"]
        props = json.loads(_lxc("query", f"/1.0/images/{fingerprint}?project={project}"))[
            "properties"]
        props = {k: v for k, v in props.items() if k.startswith("modelserve_")}
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            _lxc("image", "export", fingerprint, f"{tmp}/image", "--project", project)
            (tarball,) = Path(tmp).iterdir()
            t1 = time.monotonic()
            with open(tarball, "rb") as fh:
                image = lxd_conn.image.create_image(
                    name=f"modelserve-{release}", data=fh, disk_format="lxd",
                    container_format="bare", visibility="private", wait=True, **props)
            image_id = image.id
        print(f"bake {baked:.0f} s, Glance upload {time.monotonic() - t1:.0f} s")
        yield release, image_id
    finally:
        if image_id:
            lxd_conn.image.delete_image(image_id, ignore_missing=True)
            drop_cached_image(image_id)
        if fingerprint:
            _lxc("image", "delete", fingerprint, "--project", project)
        if project == BAKE_PROJECT:
            from localcloud.openstack import lxdhost

            lxdhost.remove_project(BAKE_PROJECT)


@pytest.fixture
def lxd_env(lxd_conn, harness, os_env):
    """A fresh rollout env in project modelserve-lxd, and the CLI's environment for it."""
    name = f"t{secrets.token_hex(3)}"
    env = dict(os_env, OS_CLOUD=config.CLOUD + "-lxd",
               MODELSERVE_OS_EXTERNAL_NETWORK=seed.LXD_PUBLIC,
               MODELSERVE_OS_FLAVOR=seed.FLAVOR_LXD)
    yield name, env
    purge_env(lxd_conn, name)


def test_rollout_deploys_the_baked_image_onto_lxd_containers(lxd_conn, admin, lxd_release,
                                                             lxd_env):
    release, image_id = lxd_release
    env_name, env = lxd_env
    t0 = time.monotonic()
    res = json.loads(ok(rollout(env, "deploy", "--release", release, "--json",
                                env_name=env_name, timeout=1200)).stdout)
    print(f"deploy (first boot of the image, import included) {time.monotonic() - t0:.0f} s")
    assert res["release"] == release
    servers = [s for s in lxd_conn.compute.servers(details=True) if s.status != "DELETED"
               and s.metadata.get("modelserve_env") == env_name]
    assert len(servers) == 1 and servers[0].image.id == image_id
    name = admin.compute.get_server(servers[0].id).instance_name
    assert containers()[name]["status"] == "Running"
    # the image's own first boot ran from Nova's user_data
    out = _lxc("exec", "--project", config.LXD_PROJECT, name, "--", "cloud-init", "status",
               "--long")
    assert "status: done" in out and "seed=/var/lib/cloud/seed/nocloud" in out
    fip = fip_of(lxd_conn, env_name)
    assert fip.floating_ip_address in forwards()
    assert live_release(lxd_conn, env_name) == release
