"""Real LXD for the rollout e2e and fault tiers: the local cloud, the test project, releases,
envs, and ``python -m rollout`` runs (foreground, or in the background paused at a step).

Everything runs in the LXD project ``MODELSERVE_LXD_PROJECT`` (``modelserve-test``, set for the
session by tests/lxd_guard.py); ``lxc`` is pointed at it with a private ``LXD_CONF``.

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
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from localcloud.lxd.project import ensure_project, lxc_conf_dir
from rollout.clouds.base import preview_env
from rollout.clouds.lxd import LXDCloud
from tests import lxd_guard
from tests.e2e.standin import build_standin, image_exists, lxc

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
HOOK_WAIT_S = 600.0  # bound of every wait for a paused run (the hook's own bound)


def images_mode() -> str:
    mode = os.environ.get("ROLLOUT_E2E_IMAGES", "real")
    if mode not in ("real", "standin"):
        pytest.fail(f"ROLLOUT_E2E_IMAGES={mode!r}: use real or standin")
    return mode


def project() -> str:
    return os.environ.get("MODELSERVE_LXD_PROJECT", lxd_guard.TEST_PROJECT)


def open_lxd() -> LXDCloud:
    """The local LXD cloud, brought up by localcloud/lxd/up.sh when it does not answer; the
    test project set up (base image copied in); ``lxc`` pointed at that project."""
    if project() == "default":
        pytest.fail("the e2e tier must not run in the default LXD project")
    if not lxd_guard.lxd_answers():
        up = ROOT / "localcloud" / "lxd" / "up.sh"
        env = {k: v for k, v in os.environ.items() if k != "LXD_CONF"}
        res = subprocess.run(["bash", str(up)], capture_output=True, text=True, check=False,
                             env=env, timeout=1800)
        if res.returncode or not lxd_guard.lxd_answers():
            pytest.fail(f"localcloud/lxd/up.sh failed ({res.returncode}): {res.stderr[-2000:]}")
        lxd_guard.snapshot_after_startup()
    ensure_project(project())
    os.environ["LXD_CONF"] = str(lxc_conf_dir(project()))
    return LXDCloud(project=project())


def _tree_sha() -> str:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=False).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def bake(release: str) -> None:
    """Bake modelserve-<release> from this tree into the test project, unless an image of
    this very commit exists there."""
    alias = f"modelserve-{release}"
    if image_exists(alias):
        have = lxc("image", "get-property", alias, "modelserve_git_sha", check=False).strip()
        if os.environ.get("ROLLOUT_E2E_REUSE_IMAGES") == "1" or (
                have == _tree_sha() and not have.endswith("-dirty")):
            return
        lxc("image", "delete", alias, check=False)
    res = subprocess.run(["make", "-C", str(ROOT), "image", f"RELEASE={release}",
                          "ALLOW_DIRTY=1"],
                         capture_output=True, text=True, check=False)
    if res.returncode:
        pytest.fail(f"make image RELEASE={release} failed: {res.stdout[-1500:]}"
                    f"{res.stderr[-1500:]}")


def release_pair() -> tuple[str, str]:
    """Two releases A and B with images (real bakes, or stand-ins; see module doc)."""
    real = images_mode() == "real"
    a = os.environ.get("ROLLOUT_E2E_RELEASE_A", "e2e-a" if real else "standin-a")
    b = os.environ.get("ROLLOUT_E2E_RELEASE_B", "e2e-b" if real else "standin-b")
    if real:
        bake(a)
        bake(b)
    else:
        build_standin(a, accuracy=0.78)
        build_standin(b, accuracy=0.80)
    return a, b


def destroy_env(cloud: LXDCloud, env: str) -> None:
    """Delete everything an env has (instances, floating IPs, mutex profiles)."""
    for inst in cloud.list_instances(env):
        cloud.delete_instance(inst.id)
    for key in (env, preview_env(env)):
        while (fip := cloud.find_floating_ip(key)) is not None:
            cloud.delete_floating_ip(fip)
        cloud._drop_mutex(key, force=True)  # noqa: SLF001 - a test's env: nobody else's


def new_env_name(prefix: str = "t") -> str:
    """A fresh env name, registered for the session's end-of-run forward sweep."""
    return lxd_guard.register_env(f"{prefix}{secrets.token_hex(3)}")


class Result:
    """A finished ``python -m rollout`` run."""

    def __init__(self, rc: int, out: str, err: str):
        self.rc, self.out, self.err = rc, out, err
        try:
            self.json = json.loads(out) if out.strip() else None
        except ValueError:
            self.json = None

    def __repr__(self) -> str:
        return f"Result(rc={self.rc}, out={self.out[-500:]!r}, err={self.err[-1500:]!r})"


def run_rollout(*args: str, timeout: float = 900, env: dict | None = None) -> Result:
    """``python -m rollout ARGS --json`` in the repo root."""
    res = subprocess.run([PY, "-m", "rollout", *args, "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, check=False, env=env)
    return Result(res.returncode, res.stdout, res.stderr)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Background:
    """A ``python -m rollout`` run in the background, optionally paused before a step kind
    (the contract's hook: MODELSERVE_ROLLOUT_PAUSE_BEFORE / MODELSERVE_ROLLOUT_HOOK_DIR)."""

    def __init__(self, *args: str, pause: str | None = None, sigint_ignored: bool = False):
        self.hook_dir = Path(tempfile.mkdtemp(prefix="ms-hook-"))
        self.pause = pause
        env = dict(os.environ)
        if pause:
            env["MODELSERVE_ROLLOUT_PAUSE_BEFORE"] = pause
            env["MODELSERVE_ROLLOUT_HOOK_DIR"] = str(self.hook_dir)
        self.proc = subprocess.Popen(
            [PY, "-m", "rollout", *args, "--json"], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=_ignore_sigint if sigint_ignored else None)
        self.result: Result | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_paused(self) -> None:
        """Until the run reached the pause (``<kind>.reached``) or ended (a test failure)."""
        reached = self.hook_dir / f"{self.pause}.reached"
        deadline = time.monotonic() + HOOK_WAIT_S
        while not reached.exists():
            if self.proc.poll() is not None:
                res = self.finish()
                pytest.fail(f"the run ended before reaching {self.pause}: {res!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"the run did not reach {self.pause} in {HOOK_WAIT_S:.0f} s")
            time.sleep(0.05)

    def go(self) -> None:
        (self.hook_dir / f"{self.pause}.go").touch()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def finish_after_signal(self, timeout: float = 300) -> Result:
        """The result of a run just signalled; a run that ignores the signal fails the test
        (and is killed by ``close``) instead of waiting out the hook's 600 s."""
        try:
            return self.finish(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run did not end within {timeout:.0f} s of the signal")

    def finish(self, timeout: float = 600) -> Result:
        if self.result is None:
            out, err = self.proc.communicate(timeout=timeout)
            self.result = Result(self.proc.returncode, out, err)
        return self.result

    def close(self) -> None:
        """Kill the run if it still runs; close its pipes (no ResourceWarning)."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.finish(timeout=60)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()
        for p in self.hook_dir.iterdir():
            p.unlink()
        self.hook_dir.rmdir()
