"""The real modelserve image, baked through Nova and deployed through Nova: `packer/bake.py
--cloud openstack` runs Packer's openstack source against the harness (a build server booted
from the deps image in Glance on the LXD compute host, Packer's temporary keypair, SSH to its
fixed IP on the harness's bridge, the image-scripts, a snapshot into Glance with the
``modelserve_*`` properties), then `python -m rollout deploy --cloud openstack` boots that image
in project ``modelserve-lxd`` (cloud-init runs rollout's NoCloud seed from Nova's user_data; the
health gate, the prediction check and /version go through the image's services and the
floating IP, an LXD network forward), and `rollout rollback` goes back.

Both layers go through Packer's openstack source: the deps layer (OS packages, the
distribution's security updates, the TensorFlow venv from the hashed lock) from the Glance
base image, reused while its key is unchanged (137 s when baked here), then each release
layer from it."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localcloud.openstack import config, seed
from rollout.seed import parse_user_data
from tests.image import hygiene
from tests.openstack.osenv import ROOT, fip_of, live_release, live_servers, ok, purge_env, rollout
from tests.openstack.test_lxd_host import containers, forwards, in_container

pytestmark = pytest.mark.openstack

META = json.loads((ROOT / "app/bundle/metadata.json").read_text())


def _lxc(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "LXD_CONF"}
    proc = subprocess.run(["lxc", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, f"lxc {args[:4]}: {proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def os_deps(os_bakes):
    """The OpenStack deps layer in Glance, baked through Nova by `packer/bake.py --cloud
    openstack --deps-only` (reused while its key is unchanged) in the background since the
    tier started (tests/openstack/bakes.py, conftest.py os_bakes)."""
    res = os_bakes.wait("deps")
    print(f"openstack deps layer {res['deps_image']}: "
          f"{'reused' if res['reused'] else 'baked through Nova'} in {res['seconds']} s")
    return res


@pytest.fixture(scope="module")
def os_releases(os_bakes, os_deps):
    """Two releases baked by `packer/bake.py --cloud openstack` (release layer through Packer's
    openstack source) after the deps layer; their Glance images are deleted at the end. Once
    this returns no bake runs any more (the fault cases below rely on that)."""
    made = [os_bakes.wait("a"), os_bakes.wait("b")]
    os_bakes.wait_all()
    for letter, res in zip("ab", made, strict=True):
        print(f"openstack bake {letter} (release layer through Nova) {res['release_seconds']} s")
    return made


@pytest.fixture
def lxd_env(lxd_conn, harness, os_env):
    """A fresh rollout env in project modelserve-lxd, and the CLI's environment for it."""
    name = f"t{secrets.token_hex(3)}"
    env = dict(os_env, OS_CLOUD=config.CLOUD + "-lxd",
               MODELSERVE_OS_EXTERNAL_NETWORK=seed.LXD_PUBLIC,
               MODELSERVE_OS_FLAVOR=seed.FLAVOR_LXD)
    yield name, env
    purge_env(lxd_conn, name)


def test_the_openstack_bake_went_through_nova_into_glance(lxd_conn, admin, os_deps,
                                                          os_releases):
    res = os_releases[0]
    assert res["cloud"] == "openstack" and res["deps_reused"] is True
    assert res["deps_image"] == os_deps["deps_image"]
    img = lxd_conn.image.get_image(res["image_id"])
    props = img.properties or {}
    assert img.name == f"modelserve-{res['release']}" and img.status == "active"
    assert (img.disk_format, img.container_format) == ("lxd", "bare")  # the driver's snapshot
    assert img.visibility == "private" and f"release-{res['release']}" in img.tags
    assert props["modelserve_release"] == res["release"]
    assert props["modelserve_provenance"] == "release"
    assert props["modelserve_model_sha256"] == META["sha256"]
    assert props["modelserve_accuracy_floor"] == f"{META['accuracy_floor']:g}"
    # git archive of HEAD, or the working tree when it has changes (--allow-dirty)
    assert (props["modelserve_git_sha"], props["modelserve_dirty"]) == (res["git_sha"],
                                                                         res["dirty"])
    assert (props["os"], props["release"]) == ("debian", "bookworm")
    # a Nova snapshot of a server booted from the deps image (Packer's source), itself a Nova
    # snapshot of a server booted from the Glance base: Nova names the first image of such a
    # chain as base_image_ref (it keeps the source's), and the release inherits the deps
    # layer's properties, its key among them
    assert res["deps_image_id"] == os_deps["image_id"]
    deps_props = lxd_conn.image.get_image(os_deps["image_id"]).properties or {}
    base = next(lxd_conn.image.images(name=seed.BASE_IMAGE))
    assert props["base_image_ref"] == deps_props["base_image_ref"] == base.id
    assert props["modelserve_deps_key"] == deps_props["modelserve_deps_key"] == os_deps["deps_key"]
    # Packer cleaned up after itself: no build server, no temporary keypair
    assert not [s for s in admin.compute.servers(details=True, all_projects=True)
                if s.name.startswith("packer_") and s.status != "DELETED"]
    assert not [k for k in lxd_conn.compute.keypairs() if k.name.startswith("packer_")]


def test_rollout_deploys_and_rolls_back_the_packer_baked_images(lxd_conn, admin, os_releases,
                                                                lxd_env):
    a, b = (r["release"] for r in os_releases)
    env_name, env = lxd_env
    for release, image_id, workers in ((a, os_releases[0]["image_id"], "0"),
                                       (b, os_releases[1]["image_id"], "1")):
        t0 = time.monotonic()
        res = json.loads(ok(rollout(env, "deploy", "--release", release, "--json",
                                    "--workers", workers, env_name=env_name,
                                    timeout=1200)).stdout)
        print(f"deploy {release} (gate, prediction check, switch) {time.monotonic() - t0:.0f} s")
        assert res["release"] == release
        assert live_release(lxd_conn, env_name) == release
        servers = [s for s in lxd_conn.compute.servers(details=True) if s.status != "DELETED"
                   and s.metadata.get("modelserve_env") == env_name
                   and s.image.id == image_id]
        assert servers, f"no server of {release} booted from Glance image {image_id}"
    front = next(s for s in servers if s.metadata["modelserve_role"] == "front")
    worker = next(s for s in servers if s.metadata["modelserve_role"] == "worker")
    name = admin.compute.get_server(front.id).instance_name
    assert containers()[name]["status"] == "Running"
    # --workers 1: the worker server's Celery consumes the front's RabbitMQ (TLS, the seed's
    # credentials): two consumers of the prediction queue on the front's vhost
    seed = parse_user_data(base64.b64decode(
        admin.compute.get_server(worker.id).user_data).decode())
    vhost = seed.get("MODELSERVE_BROKER_VHOST") or "modelserve"
    consumers = in_container(name, "rabbitmqctl", "-q", "list_consumers", "-p", vhost)
    assert sum(line.startswith("modelserve.predict") for line in consumers.splitlines()) == 2, \
        consumers
    # the image's own first boot ran from Nova's user_data
    out = _lxc("exec", "--project", config.LXD_PROJECT, name, "--", "cloud-init", "status",
               "--long")
    assert "status: done" in out and "seed=/var/lib/cloud/seed/nocloud" in out
    fip = fip_of(lxd_conn, env_name)
    assert fip.floating_ip_address in forwards()

    t0 = time.monotonic()
    ok(rollout(env, "rollback", env_name=env_name, timeout=1200))
    print(f"rollback to {a} {time.monotonic() - t0:.0f} s")
    assert live_release(lxd_conn, env_name) == a


def test_the_packer_baked_image_passes_the_hygiene_scan(lxd_conn, os_releases, request):
    """The image's files as Nova's LXD host imported them from Glance for the deploy above
    (else downloaded and imported here; a container created, never started): no private key,
    build CA, login key, config drive, machine-id, ..."""
    import importlib.util

    from localcloud.openstack import lxdhost

    spec = importlib.util.spec_from_file_location("bake", ROOT / "packer" / "bake.py")
    bake_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bake_mod)
    image_id = os_releases[0]["image_id"]
    name = f"osscan-{image_id[:8]}"
    proj = ["--project", config.LXD_PROJECT]
    if lxdhost.query(lxdhost._p(f"/1.0/images/aliases/glance-{image_id}"), check=False) is None:
        path = Path(f"/var/tmp/osscan-{image_id}")
        with open(path, "wb") as fh:
            for chunk in lxd_conn.image.download_image(image_id, stream=True).iter_content(
                    1 << 20):
                fh.write(chunk)
        try:
            _lxc("image", "import", str(path), "--alias", f"glance-{image_id}", *proj)
        finally:
            path.unlink()
    _lxc("init", f"glance-{image_id}", name, *proj)
    request.addfinalizer(lambda: subprocess.run(["lxc", "delete", "--force", name, *proj],
                                                capture_output=True))
    rootfs = Path(f"/var/lib/lxd/storage-pools/{config.LXD_POOL}/containers/"
                  f"{config.LXD_PROJECT}_{name}/rootfs")
    assert (rootfs / "opt/modelserve/RELEASE.json").is_file()
    release = json.loads((rootfs / "opt/modelserve/RELEASE.json").read_text())
    assert release["release"] == os_releases[0]["release"]
    found = hygiene.scan(rootfs, bake_mod.extra_ca_pem("auto"))
    assert not found, "\n".join(found)


@contextlib.contextmanager
def fault_switch(harness, name):
    """The LXD host driver's fault switch `name` (lxd_driver.py: a file in its instances_path)
    on for the block."""
    path = harness.layout.state / "nova-lxd/instances" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    try:
        yield
    finally:
        path.unlink()


def test_a_snapshot_that_fails_mid_upload_fails_the_bake_and_leaves_nothing(
        lxd_conn, admin, harness, os_deps, os_releases, bake_env):
    """The LXD host's snapshot breaks off half-way through its upload to Glance (the driver's
    fault switch, a file in its instances_path): Nova deletes the half-made image, Packer
    fails and deletes its build server and keypair, and bake.py exits non-zero with one line
    saying so. Nothing is left: no image in Glance, no server, no keypair, no container, no
    published snapshot on the LXD host."""
    release = f"osp-fault-{secrets.token_hex(2)}"
    before = set(containers())
    log = harness.procs.logs / "nova-compute-lxd.log"
    seen = log.stat().st_size if log.exists() else 0

    def lxd_images():
        out = _lxc("query", f"/1.0/images?recursion=1&project={config.LXD_PROJECT}")
        return {a["name"] for i in json.loads(out) for a in i.get("aliases") or []}

    with fault_switch(harness, "fault-snapshot-upload"):
        proc = subprocess.run([sys.executable, str(ROOT / "packer/bake.py"), "--cloud",
                               "openstack", "--release", release, "--env", "ci",
                               "--allow-dirty"], capture_output=True, text=True, timeout=3000,
                              env=bake_env)
    assert proc.returncode != 0, proc.stdout[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("make image: error:") and "packer build" in last, proc.stderr[-3000:]
    with open(log, "rb") as fh:  # it failed where the fault was, not elsewhere
        fh.seek(seen)
        assert b"snapshot upload broken off" in fh.read()
    assert not list(lxd_conn.image.images(name=f"modelserve-{release}"))
    assert not [s for s in admin.compute.servers(details=True, all_projects=True)
                if s.name.startswith("packer_") and s.status != "DELETED"]
    assert not [k for k in lxd_conn.compute.keypairs() if k.name.startswith("packer_")]
    assert set(containers()) <= before
    assert not [a for a in lxd_images() if a.startswith("snap-")]


def test_a_server_whose_first_boot_rejects_its_seed_fails_the_gate_and_changes_nothing(
        lxd_conn, admin, harness, os_releases, lxd_env, tmp_path):
    """The new server reaches ACTIVE and cloud-init runs, but the image's first boot rejects
    the seed (the driver's fault switch appends a malformed line to instance.env), so the
    front never serves: the health gate fails, the deploy undoes its server, and the floating
    IP still serves the live release."""
    a, b = (r["release"] for r in os_releases)
    env_name, env = lxd_env
    ok(rollout(env, "deploy", "--release", a, env_name=env_name, timeout=1200))
    before = {s.id for s in live_servers(lxd_conn, env_name)}
    fip = fip_of(lxd_conn, env_name)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    proc = None
    try:
        with fault_switch(harness, "fault-seed"):
            proc = subprocess.Popen(
                [sys.executable, "-m", "rollout", "deploy", "--cloud", "openstack", "--env",
                 env_name, "--release", b, "--health-timeout", "45", "--no-probe"], cwd=ROOT,
                env=dict(env, MODELSERVE_ROLLOUT_PAUSE_BEFORE="health_gate",
                         MODELSERVE_ROLLOUT_HOOK_DIR=str(hooks)),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 900
            while not (hooks / "health_gate.reached").exists():
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the deploy never reached its health gate"
                time.sleep(0.5)
        (new,) = [s for s in live_servers(lxd_conn, env_name) if s.id not in before]
        assert new.status == "ACTIVE"
        name = admin.compute.get_server(new.id).instance_name
        state = ""
        for _ in range(120):  # first boot runs once cloud-init has written the seed's files
            state = subprocess.run(
                ["lxc", "exec", "--project", config.LXD_PROJECT, name, "--", "systemctl",
                 "is-failed", "modelserve-firstboot.service"], capture_output=True,
                text=True).stdout.strip()
            if state == "failed":
                break
            time.sleep(1)
        assert state == "failed", f"modelserve-firstboot on {name}: {state}"
        journal = in_container(name, "journalctl", "-u", "modelserve-firstboot", "--no-pager")
        assert "malformed line (expected KEY=VALUE)" in journal
        (hooks / "health_gate.go").touch()
        out, err = proc.communicate(timeout=600)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
    assert proc.returncode == 5, f"rc={proc.returncode}\n{out}\n{err[-3000:]}"
    assert "health gate" in err
    assert live_release(lxd_conn, env_name) == a
    assert fip_of(lxd_conn, env_name).port_id == fip.port_id
    for _ in range(120):  # the undo asked Nova to delete the server; Nova finishes it
        left = {s.id for s in live_servers(lxd_conn, env_name)}
        if left == before and name not in containers():
            break
        time.sleep(1)
    assert left == before and name not in containers(), (left, before)
