"""Helpers of the image tier: bakes, seeds, containers (fixtures in conftest.py).

Everything runs in the LXD project ``MODELSERVE_LXD_PROJECT`` (``modelserve-test``, set for the
session by tests/lxd_guard.py): ``use_test_project`` sets it up and points ``lxc`` (and so
packer and bake.py) at it with a private ``LXD_CONF``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from localcloud.lxd.project import ensure_project, lxc_conf_dir
from tests import lxd_guard

ROOT = Path(__file__).resolve().parents[2]
BAKE = ROOT / "packer" / "bake.py"


def sh(*cmd: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """Run a command and capture its text output; fail the test with its stderr on error."""
    proc = subprocess.run(cmd, text=True, capture_output=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} -> exit {proc.returncode}\n{proc.stdout[-3000:]}"
                    f"\n{proc.stderr[-3000:]}")
    return proc


def bake(release: str, *extra: str, check: bool = True) -> tuple[subprocess.CompletedProcess, dict]:
    """Run packer/bake.py for one release; returns the process and its --json result."""
    proc = subprocess.run([sys.executable, str(BAKE), "--release", release, "--json",
                           "--env", "ci", "--allow-dirty", *extra], text=True,
                          capture_output=True, timeout=3000)
    if check and proc.returncode != 0:
        pytest.fail(f"bake of {release} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc, (json.loads(proc.stdout) if proc.returncode == 0 else {})


def test_release_id(prefix: str) -> str:
    """A unique, DNS-label safe release id for one test run."""
    return f"{prefix}-{time.strftime('%m%d%H%M', time.gmtime())}-{uuid.uuid4().hex[:4]}"


test_release_id.__test__ = False  # a helper, not a test


STALE_AFTER = 3 * 3600  # leftovers of a killed earlier run of this tier, never a live one


def sweep_stale() -> None:
    """Delete this tier's containers and images left by a run that was killed mid-way."""
    now = dt.datetime.now(dt.timezone.utc)

    def old(item: dict) -> bool:
        try:
            created = dt.datetime.fromisoformat(item.get("created_at", "")[:19])
        except ValueError:
            return False
        return (now - created.replace(tzinfo=dt.timezone.utc)).total_seconds() > STALE_AFTER

    for c in json.loads(sh("lxc", "list", "--format", "json").stdout or "[]"):
        if c["name"].startswith(("ms-imgtest-", "ms-imgscan-")) and old(c):
            subprocess.run(["lxc", "delete", "--force", c["name"]], capture_output=True)
    for img in json.loads(sh("lxc", "image", "list", "--format", "json").stdout or "[]"):
        rel = img.get("properties", {}).get("modelserve_release", "")
        if rel.startswith(("rt-", "bench-")) and old(img):
            subprocess.run(["lxc", "image", "delete", img["fingerprint"]], capture_output=True)


def seed(role: str, release: str, *, broker_host: str = "127.0.0.1", bind: str = "127.0.0.1",
         creds: dict | None = None) -> tuple[str, dict]:
    """NoCloud user-data writing /etc/modelserve/instance.env, with fresh credentials."""
    c = creds or {"user": f"ms-{secrets.token_hex(4)}", "password": secrets.token_hex(24),
                  "redis": secrets.token_hex(24)}
    env = {
        "MODELSERVE_ROLE": role, "MODELSERVE_COLOUR": "blue", "MODELSERVE_RELEASE": release,
        "MODELSERVE_DEPLOY_ID": "d-test", "MODELSERVE_ENV": "ci",
        "MODELSERVE_BROKER_USER": c["user"], "MODELSERVE_BROKER_PASSWORD": c["password"],
        "MODELSERVE_BROKER_VHOST": "modelserve",
        "MODELSERVE_BROKER_URL": f"amqp://{c['user']}:{c['password']}@{broker_host}:5672/modelserve",
        "MODELSERVE_REDIS_PASSWORD": c["redis"],
        "MODELSERVE_RESULT_URL": f"redis://:{c['redis']}@{broker_host}:6379/0",
        "MODELSERVE_BROKER_BIND": bind, "MODELSERVE_PORT": "8080",
        "MODELSERVE_WORKER_CONCURRENCY": "1",
    }
    body = "".join(f"      {k}={v}\n" for k, v in env.items())
    user_data = ("#cloud-config\nwrite_files:\n  - path: /etc/modelserve/instance.env\n"
                 "    owner: root:root\n    permissions: \"0600\"\n    content: |\n" + body)
    return user_data, c


class Instance:
    """A container booted from an image with a seed; exec and address helpers."""

    def __init__(self, name: str):
        self.name = name

    def exec(self, *cmd: str, check: bool = True, timeout: float = 120) -> str:
        """Run a command inside the container; its stdout."""
        return sh("lxc", "exec", self.name, "--", *cmd, check=check, timeout=timeout).stdout

    def ipv4(self, timeout: float = 60) -> str:
        """The container's eth0 address on the bridge."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = json.loads(sh("lxc", "query", f"/1.0/instances/{self.name}/state"
                                  f"?project={project()}").stdout)
            for addr in (state.get("network") or {}).get("eth0", {}).get("addresses", []):
                if addr["family"] == "inet":
                    return addr["address"]
            time.sleep(1)
        pytest.fail(f"{self.name} got no IPv4 address in {timeout} s")




def project() -> str:
    return os.environ.get("MODELSERVE_LXD_PROJECT", lxd_guard.TEST_PROJECT)


def use_test_project() -> None:
    """The test project set up (base image copied in) and ``lxc`` pointed at it."""
    if project() == "default":
        pytest.fail("the image tier must not run in the default LXD project")
    ensure_project(project())
    os.environ["LXD_CONF"] = str(lxc_conf_dir(project()))


def default_env() -> dict[str, str]:
    """The environment for localcloud/lxd/up.sh (it sets up the default project)."""
    return {k: v for k, v in os.environ.items() if k != "LXD_CONF"}
