"""Real LXD for the rollout e2e and fault tiers: the local cloud, release images, envs.

Images: ``ROLLOUT_E2E_IMAGES=real`` (the default) bakes releases A and B of this tree with the
image tier (``make image RELEASE=e2e-a``); ``standin`` builds them from the base image with a
stdlib app speaking the contract (standin.py) — minutes faster, for developing the tool.
Broken releases (fault cases) are always stand-ins: a broken image is the point there.
Real images are re-baked unless they were baked from this very commit (clean tree);
``ROLLOUT_E2E_REUSE_IMAGES=1`` reuses whatever exists (development).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from rollout.clouds.lxd import LXDCloud

sys.path.insert(0, str(Path(__file__).resolve().parent))
from standin import build_standin, image_exists  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
PY = sys.executable


def images_mode() -> str:
    mode = os.environ.get("ROLLOUT_E2E_IMAGES", "real")
    if mode not in ("real", "standin"):
        pytest.fail(f"ROLLOUT_E2E_IMAGES={mode!r}: use real or standin")
    return mode


def _lxd_answers() -> bool:
    try:
        return subprocess.run(["lxc", "query", "/1.0"], capture_output=True, timeout=20,
                              check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def cloud() -> LXDCloud:
    """The local LXD cloud, brought up by localcloud/lxd/up.sh when it does not answer."""
    if not _lxd_answers():
        up = ROOT / "localcloud" / "lxd" / "up.sh"
        if not up.exists():
            pytest.fail("LXD does not answer and localcloud/lxd/up.sh is missing")
        res = subprocess.run(["bash", str(up)], capture_output=True, text=True, check=False)
        if res.returncode or not _lxd_answers():
            pytest.fail(f"localcloud/lxd/up.sh failed ({res.returncode}): {res.stderr[-2000:]}")
    return LXDCloud()


def _tree_sha() -> str:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=False).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def _bake(release: str) -> None:
    """Bake modelserve-<release> from this tree, unless an image of this very commit exists."""
    alias = f"modelserve-{release}"
    if image_exists(alias):
        have = subprocess.run(["lxc", "image", "get-property", alias, "modelserve_git_sha"],
                              capture_output=True, text=True, check=False).stdout.strip()
        if os.environ.get("ROLLOUT_E2E_REUSE_IMAGES") == "1" or (
                have == _tree_sha() and not have.endswith("-dirty")):
            return
        subprocess.run(["lxc", "image", "delete", alias], capture_output=True, check=False)
    res = subprocess.run(["make", "-C", str(ROOT), "image", f"RELEASE={release}"],
                         capture_output=True, text=True, check=False)
    if res.returncode:
        pytest.fail(f"make image RELEASE={release} failed: {res.stdout[-1500:]}"
                    f"{res.stderr[-1500:]}")


@pytest.fixture(scope="session")
def releases(cloud) -> tuple[str, str]:
    """Two releases A and B with images (real bakes, or stand-ins; see module doc)."""
    real = images_mode() == "real"
    a = os.environ.get("ROLLOUT_E2E_RELEASE_A", "e2e-a" if real else "standin-a")
    b = os.environ.get("ROLLOUT_E2E_RELEASE_B", "e2e-b" if real else "standin-b")
    if real:
        _bake(a)
        _bake(b)
    else:
        build_standin(a, accuracy=0.78)
        build_standin(b, accuracy=0.80)
    return a, b


def destroy_env(cloud: LXDCloud, env: str) -> None:
    """Delete everything an env has (instances, floating IP)."""
    for inst in cloud.list_instances(env):
        cloud.delete_instance(inst.id)
    fip = cloud.find_floating_ip(env)
    if fip:
        cloud.delete_floating_ip(fip)


@pytest.fixture
def new_env(cloud):
    """A fresh env name per test, destroyed afterwards (whatever the test left)."""
    made = []

    def make(prefix: str = "t") -> str:
        env = f"{prefix}{secrets.token_hex(3)}"
        made.append(env)
        return env

    yield make
    for env in made:
        destroy_env(cloud, env)


class Result:
    """A finished ``python -m rollout`` run."""

    def __init__(self, rc: int, out: str, err: str):
        self.rc, self.out, self.err = rc, out, err
        try:
            self.json = json.loads(out) if out.strip() else None
        except ValueError:
            self.json = None

    def __repr__(self) -> str:
        return f"Result(rc={self.rc}, err={self.err[-1500:]!r})"


def run_rollout(*args: str, timeout: float = 900) -> Result:
    """``python -m rollout ARGS --json`` in the repo root."""
    res = subprocess.run([PY, "-m", "rollout", *args, "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, check=False)
    return Result(res.returncode, res.stdout, res.stderr)


@pytest.fixture
def rollout():
    return run_rollout
