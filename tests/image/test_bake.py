"""A real bake on the local LXD cloud, then real boots from the baked image with NoCloud seeds.

Checks from the host what an operator relies on: provenance properties, cloud-init done,
/readyz 200, the bundle's own answer to a prediction, services as the non-root user, no
RabbitMQ guest and the seed's broker user working, only the app port on all interfaces, the
worker role, image hygiene, and that a failing provisioner leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.image import hygiene
from tests.image.imgenv import ROOT, bake, project, seed, sh, test_release_id

pytestmark = pytest.mark.image
META = json.loads((ROOT / "app" / "bundle" / "metadata.json").read_text())
PROVENANCE_KEYS = ("modelserve_release", "modelserve_git_sha", "modelserve_app_version",
                   "modelserve_model_sha256", "modelserve_model_accuracy", "modelserve_built_at")


def http(url: str, body: dict | None = None, timeout: float = 10) -> tuple[int, dict]:
    """GET (or POST JSON) from the host; (status, parsed JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_ready(base: str, timeout: float = 240, until=lambda body: True,
               what: str = "") -> dict:
    """Poll /readyz until 200 (and ``until(body)``); fail with the last answer."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            status, body = http(f"{base}/readyz")
            if status == 200 and until(body):
                return body
            last = (status, body)
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(2)
    pytest.fail(f"{base}/readyz not 200{what} within {timeout} s; last: {last}")


def boot(launch, image: str, user_data: str):
    """Launch, wait for cloud-init to finish, return the instance."""
    inst = launch(image, user_data)
    status = inst.exec("cloud-init", "status", "--wait", "--long", check=False, timeout=300)
    assert "status: done" in status, status
    return inst


def test_image_carries_its_provenance(baked):
    info = json.loads(sh("lxc", "query", f"/1.0/images/{baked['fingerprint']}"
                         f"?project={project()}").stdout)
    props = info["properties"]
    assert {a["name"] for a in info["aliases"]} == {f"modelserve-{baked['release']}"}
    assert props["modelserve_release"] == baked["release"]
    assert props["modelserve_model_sha256"] == META["sha256"]
    assert float(props["modelserve_model_accuracy"]) == META["metrics"]["accuracy"]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", props["modelserve_git_sha"])
    # from `git archive` of HEAD, or (this tier bakes with --allow-dirty) marked as dirty
    assert props["modelserve_dirty"] == ("true" if props["modelserve_git_sha"].endswith(
        "-dirty") else "false")
    assert re.fullmatch(r"\d{4}-W\d\d", props["modelserve_security_week"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", props["modelserve_built_at"])
    assert all(props.get(k) for k in PROVENANCE_KEYS)
    assert props["os"] and props["description"]


def test_bake_goes_to_the_test_project_only(baked):
    """The bake (packer's `lxc` included) works in MODELSERVE_LXD_PROJECT, never in default."""
    alias = f"modelserve-{baked['release']}"
    here = sh("lxc", "query", f"/1.0/images/aliases/{alias}?project={project()}", check=False)
    there = sh("lxc", "query", f"/1.0/images/aliases/{alias}?project=default", check=False)
    assert here.returncode == 0 and json.loads(here.stdout)["target"] == baked["fingerprint"]
    assert there.returncode != 0, there.stdout
    assert sh("lxc", "query", f"/1.0/profiles/modelserve-bake?project={project()}",
              check=False).returncode == 0


def test_front_boots_serving_the_bundle(baked, launch, tmp_path):
    user_data, creds = seed("front", baked["release"])
    inst = boot(launch, baked["image"], user_data)
    base = f"http://{inst.ipv4()}:8080"
    ready = wait_ready(base)
    assert ready["checks"]["broker"] == "ok", ready

    sample = META["holdout_sample"][0]
    status, body = http(f"{base}/api/v1/predictions", {"instances": [sample["features"]]})
    assert status == 200, body
    assert body["predictions"][0]["label"] == sample["predicted"]
    assert body["predictions"][0]["probability"] == pytest.approx(sample["probability"], abs=1e-5)
    assert body["model"]["sha256"] == META["sha256"]
    status, version = http(f"{base}/version")
    assert version["release"] == baked["release"] and version["model_sha256"] == META["sha256"]
    # the distribution's updates (security included) of the layer's week were applied at
    # bake time (upgrade_os.sh fails the bake when anything is left to upgrade)
    updates = inst.exec("cat", "/etc/modelserve/os-updates")
    assert re.search(r"^security_week=\d{4}-W\d\d$", updates, re.M), updates
    assert re.search(r"^upgraded=\d+$", updates, re.M) and "debian-security" in updates, updates

    # every file holding a password is private to root and the service's group, and no
    # process has a password on its command line
    # (the patterns go in a root-only file, so no command line of this check holds them)
    patterns = tmp_path / "patterns"
    patterns.write_text("\n".join((creds["password"], creds["redis"])) + "\n")
    sh("lxc", "file", "push", "--mode", "0600", str(patterns), f"{inst.name}/root/.ms-scan")
    holders = [p for p in sh("lxc", "exec", inst.name, "--", "sh", "-c",
                             "grep -rlF -D skip -f /root/.ms-scan /etc /var/lib/cloud /run /opt /var/log "
                             "/root /tmp 2>/dev/null; true").stdout.split()
               if p != "/root/.ms-scan"]
    assert "/etc/modelserve/instance.env" in holders, holders  # the scan sees the secrets
    modes = {path: inst.exec("stat", "-c", "%a %U %G", path).split() for path in holders}
    readable = {p: m for p, m in modes.items()
                if int(m[0], 8) & 0o007 or m[2] not in ("root", "rabbitmq", "redis", "modelserve")}
    # (before this test runs rabbitmqctl/redis-cli with the passwords: journald records
    # every logging process's command line)
    logged = inst.exec("sh", "-c", "journalctl -o export --no-pager | grep -a -F -f /root/.ms-scan "
                       "| cut -c1-300; true")
    assert not logged, f"the journal holds a password:\n{logged[:3000]}"
    assert not readable, f"world-readable or foreign-group files hold a password: {readable}"
    cmdlines = sh("lxc", "exec", inst.name, "--", "sh", "-c",
                  "grep -lF -f /root/.ms-scan /proc/[0-9]*/cmdline 2>/dev/null; true").stdout.split()
    assert not cmdlines, [inst.exec("cat", c, check=False) for c in cmdlines]

    # services run as the non-root service user
    uid = int(inst.exec("id", "-u", "modelserve"))
    assert uid != 0
    for unit in ("modelserve-web", "modelserve-worker"):
        pid = inst.exec("systemctl", "show", "-p", "MainPID", "--value", unit).strip()
        assert pid not in ("", "0"), f"{unit} is not running"
        status_text = inst.exec("cat", f"/proc/{pid}/status")
        assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s", status_text, re.M), (unit, status_text)

    # RabbitMQ: the seed's user only, no guest; the user authenticates, guest does not
    users = inst.exec("rabbitmqctl", "-q", "--no-table-headers", "list_users").split()
    assert "guest" not in users and creds["user"] in users
    inst.exec("rabbitmqctl", "-q", "authenticate_user", creds["user"], creds["password"])
    assert "modelserve" in inst.exec("rabbitmqctl", "-q", "--no-table-headers", "list_vhosts")
    bad = sh("lxc", "exec", inst.name, "--", "rabbitmqctl", "-q", "authenticate_user", "guest",
             "guest", check=False)
    assert bad.returncode != 0
    # Redis wants the seed's password
    assert "NOAUTH" in inst.exec("redis-cli", "ping", check=False) + inst.exec(
        "redis-cli", "ping", check=False)
    assert inst.exec("redis-cli", "--no-auth-warning", "-a", creds["redis"], "ping").strip() == "PONG"

    # only the app port listens on all interfaces
    wide = [line.split()[3] for line in inst.exec("ss", "-ltnH").splitlines()
            if not re.match(r"(127\.|\[::1\]|::1)", line.split()[3])]
    assert wide and all(addr.rsplit(":", 1)[1] == "8080" for addr in wide), wide


def test_worker_role_serves_a_front(baked, launch):
    # the TLS broker path as rollout seeds it; the front's address is not known beforehand
    # here, so any peer may reach its TLS ports and workers verify the CA chain alone
    from rollout import tls
    from rollout.seed import Credentials, SeedParams, render_user_data

    common = dict(colour="blue", release=baked["release"], deploy_id="d-test", env="ci",
                  credentials=Credentials.generate(), tls=tls.generate(None),
                  worker_concurrency=1)
    front = boot(launch, baked["image"], render_user_data(
        SeedParams(role="front", broker_bind="0.0.0.0", **common)))
    front_ip = front.ipv4()
    worker = boot(launch, baked["image"], render_user_data(
        SeedParams(role="worker", broker_host=front_ip, **common)))
    for unit in ("rabbitmq-server", "redis-server", "modelserve-web"):
        state = worker.exec("systemctl", "is-active", unit, check=False).strip()
        assert state == "inactive", (unit, state)
    assert worker.exec("systemctl", "is-active", "modelserve-worker").strip() == "active"
    # the front's own worker stops: predictions must now be answered by the worker instance
    front.exec("systemctl", "stop", "modelserve-worker")
    base = f"http://{front_ip}:8080"
    # the worker instance's two Celery workers: the sync queue's and its async child's (a
    # loaded machine may start the child's TensorFlow seconds after the first answers)
    wait_ready(base, until=lambda body: body["checks"]["workers"].startswith("2 "),
               what=" with 2 workers answering")
    sample = META["holdout_sample"][1]
    status, body = http(f"{base}/api/v1/predictions", {"instances": [sample["features"]]},
                        timeout=30)
    assert status == 200, body
    assert body["predictions"][0]["probability"] == pytest.approx(sample["probability"], abs=1e-5)
    # the seed's 2 web processes (app.serve.serve_processes) under the unit, one its main
    main_pid = front.exec("systemctl", "show", "-P", "MainPID", "modelserve-web").strip()
    pids = front.exec("pgrep", "-f", "-x", ".*python -m app.serve").split()
    assert len(pids) == 2 and main_pid in pids, (main_pid, pids)
    assert front.exec("pgrep", "-P", main_pid).split() == [p for p in pids if p != main_pid]


def test_image_hygiene(baked, local_cloud, request):
    """Scan the image's files (a created, never started container) for what must not ship."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bake", ROOT / "packer" / "bake.py")
    bake_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bake_mod)
    name = f"ms-imgscan-{baked['fingerprint'][:8]}"
    sh("lxc", "init", baked["image"], name)
    request.addfinalizer(lambda: sh("lxc", "delete", "--force", name, check=False))
    pool = json.loads(sh("lxc", "query", f"/1.0/instances/{name}?project={project()}"
                         ).stdout)["expanded_devices"]
    pool_name = pool["root"]["pool"]
    lxd_dir = os.environ.get("LXD_DIR", "/var/lib/lxd")
    # LXD keeps a non-default project's volumes as <project>_<name>
    volume = name if project() == "default" else f"{project()}_{name}"
    rootfs = Path(f"{lxd_dir}/storage-pools/{pool_name}/containers/{volume}/rootfs")
    assert (rootfs / "opt/modelserve/RELEASE.json").is_file()

    found = hygiene.scan(rootfs, bake_mod.extra_ca_pem("auto"))
    assert not found, "\n".join(found)


def test_failing_provisioner_names_script_and_line_and_leaves_nothing(baked, tmp_path):
    scripts = tmp_path / "image-scripts"
    shutil.copytree(ROOT / "image-scripts", scripts)
    target = scripts / "install_units.sh"
    lines = target.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("units=")) + 1
    lines.insert(at, "false  # injected by the failure-path test\n")
    target.write_text("".join(lines))
    release = test_release_id("rtfail")
    proc, _ = bake(release, "--scripts-dir", str(scripts), "--skip-local-cloud", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert f"install_units.sh failed at line {at + 1}" in last, last
    assert "false" in last
    containers = json.loads(sh("lxc", "list", "--format", "json").stdout)
    assert not [c["name"] for c in containers if release in c["name"]]
    images = json.loads(sh("lxc", "image", "list", "--format", "json").stdout)
    assert not [i for i in images
                if i.get("properties", {}).get("modelserve_release") == release
                or any(release in a["name"] for a in i.get("aliases") or [])]
