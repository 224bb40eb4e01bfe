"""The OpenStack tier's Packer bakes through Nova, started as soon as the tier starts.

`packer/bake.py --cloud openstack` bakes the deps layer (OS packages, the TensorFlow venv from
the hashed lock: minutes) and then two release layers, each a real Packer openstack build (a
server booted through Nova, SSH, a snapshot into Glance). Only test_lxd_release.py needs them,
so they run one after another in a background thread while the tier's other cases (which
boot stand-in servers and barely use the CPU) go on; the fixtures of test_lxd_release.py wait
for them. What the bakes are is unchanged: the same command, the same images, the same checks.

The cases that disturb the control plane (test_faults.py restarts Nova's API and Neutron and
exhausts the project's quota; test_lxd_release.py's fault switches break snapshots and seeds)
run only once every bake has ended: conftest.py orders them last, and they wait for the chain.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.openstack.osenv import ROOT

STEPS = ("deps", "a", "b")


class BakeChain:
    """deps, then release a, then release b, each `bake.py ... --json` in a subprocess."""

    def __init__(self, env: dict, conn):
        self.env, self.conn = env, conn
        self.results: dict[str, dict] = {}
        self.error: str | None = None
        self.events = {step: threading.Event() for step in STEPS}
        self.seconds: dict[str, float] = {}
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="openstack-bakes", daemon=True)

    def start(self) -> BakeChain:
        self._thread.start()
        return self

    def bake(self, *args: str, timeout: float = 3000) -> dict:
        """`packer/bake.py ARGS --json --env ci --allow-dirty` -> its JSON result."""
        if self._stopping.is_set():
            raise RuntimeError("the tier is ending: no more bakes")
        self._proc = subprocess.Popen(
            [sys.executable, str(ROOT / "packer/bake.py"), *args, "--json", "--env", "ci",
             "--allow-dirty"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=self.env, stdin=subprocess.DEVNULL)
        try:
            out, err = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, err = self._proc.communicate()
            raise RuntimeError(f"bake.py {args} took over {timeout:.0f} s:\n{err[-6000:]}") \
                from None
        if self._proc.returncode != 0:
            raise RuntimeError(f"bake.py {args} failed (exit {self._proc.returncode}):\n"
                               f"{err[-6000:]}")
        return json.loads(out)

    def _run(self) -> None:
        from tests.openstack.test_lxd_host import drop_cached_image

        step = "deps"
        try:
            t0 = time.monotonic()
            want = self.bake("--cloud", "openstack", "--print-deps-key")
            # deps layers of other keys (or seeded from LXD by an older tier) go first: one
            # ~1.5 GB layer is enough
            for img in self.conn.image.images(owner=self.conn.current_project_id):
                props = img.properties or {}
                if img.name.startswith("modelserve-deps-") and (
                        img.name != want["deps_image"] or props.get("modelserve_deps_seeded_from")):
                    self.conn.image.delete_image(img.id, ignore_missing=True)
                    drop_cached_image(img.id)
            res = self.bake("--cloud", "openstack", "--deps-only")
            self._done(step, {"deps_image": res["deps_image"], "image_id": res["deps_image_id"],
                              "deps_key": want["deps_key"], "reused": res["deps_reused"],
                              "seconds": res["deps_seconds"]}, t0)
            for step in ("a", "b"):
                t0 = time.monotonic()
                release = f"osp-{time.strftime('%m%d%H%M', time.gmtime())}-{secrets.token_hex(2)}"
                self._done(step, self.bake("--cloud", "openstack", "--release", release), t0)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
            self.error = f"the {step} bake: {exc}"
        finally:
            for event in self.events.values():
                event.set()

    def _done(self, step: str, result: dict, t0: float) -> None:
        self.results[step] = result
        self.seconds[step] = round(time.monotonic() - t0, 1)
        self.events[step].set()

    def wait(self, step: str, timeout: float = 3600) -> dict:
        """The result of ``step`` once it is baked; the test fails if it or an earlier bake
        failed."""
        if not self.events[step].wait(timeout):
            pytest.fail(f"the {step} bake through Nova did not end within {timeout:.0f} s")
        if step not in self.results:
            pytest.fail(self.error or f"the {step} bake did not run")
        return self.results[step]

    def wait_all(self, timeout: float = 3600) -> None:
        """Every bake ended (passed or failed): nothing of the chain touches Nova any more."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            pytest.fail(f"the bakes through Nova did not end within {timeout:.0f} s")

    def stop(self) -> None:
        """End the chain: a bake still running gets SIGINT (Packer deletes its build server
        and keypair), then SIGKILL after 5 minutes."""
        self._stopping.set()
        proc = self._proc
        if self._thread.is_alive() and proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(300)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._thread.join(60)

    def release_images(self) -> list[str]:
        """Glance ids of the release images the chain made."""
        return [self.results[s]["image_id"] for s in ("a", "b") if s in self.results]
