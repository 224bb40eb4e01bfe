"""Build stand-in release images (the base image + a stdlib app speaking the contract).

Used only where a *broken* or throw-away release is the point of a test (a release whose
/readyz fails, a release with a worse model) and while developing without the real image.
Images get the same properties as a real bake: modelserve_release, _model_sha256, ...
plus ``modelserve_provenance=standin`` (never picked as a default release) and
``modelserve_accuracy_floor``. Built in the test project (``lxc`` with lxdenv's LXD_CONF).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent / "standin"
BASE = "modelserve-base-debian12"


def lxc(*args: str, check: bool = True, input: str | None = None) -> str:
    """``lxc`` in the test project (LXD_CONF set by lxdenv.open_lxd; refused without it)."""
    if "LXD_CONF" not in os.environ:
        raise RuntimeError("stand-ins are built in the test project: call lxdenv.open_lxd first")
    res = subprocess.run(["lxc", *args], capture_output=True, text=True, input=input,
                         check=False, timeout=600)
    if check and res.returncode:
        raise RuntimeError(f"lxc {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def image_exists(alias: str) -> bool:
    return bool(lxc("image", "list", alias, "--format", "csv", "-c", "l").strip())


def standin_sha(release: str) -> str:
    return hashlib.sha256(f"standin-model-{release}".encode()).hexdigest()


def build_standin(release: str, *, accuracy: float = 0.78, fail_readyz: bool = False,
                  base: str = BASE, built_at: str | None = None,
                  claimed_sha: str | None = None, accuracy_floor: float = 0.5,
                  degrade: str = "", flip: bool = False) -> str:
    """Publish ``modelserve-<release>`` from the base image with the stand-in app.

    ``claimed_sha``: the image property says this model sha256, the app serves another one.
    ``degrade``: ``"fail N"`` / ``"slow N"``, baked into the image (/opt/standin/degrade): N s
    after its first prediction (the health gate's) the app answers 500 / 1.5 s late.
    ``flip``: baked /opt/standin/flip: every prediction is probability 0.75, label 1 (the
    default stand-in answers 0.25, label 0), a model that flips every label.
    """
    alias = f"modelserve-{release}"
    spec = hashlib.sha256(repr((accuracy, fail_readyz, claimed_sha, accuracy_floor, "standin",
                                degrade, flip,
                                (HERE / "server.py").read_bytes())).encode()).hexdigest()[:16]
    if image_exists(alias):
        have = lxc("image", "get-property", alias, "standin_spec", check=False).strip()
        if have == spec:
            return alias
        lxc("image", "delete", alias)  # built with other parameters: rebuild
    name = f"ms-standin-build-{release}".replace(".", "-")[:63]
    lxc("delete", "-f", name, check=False)
    lxc("launch", base, name)
    try:
        lxc("exec", name, "--", "mkdir", "-p", "/opt/standin")
        lxc("file", "push", str(HERE / "server.py"), f"{name}/opt/standin/server.py")
        lxc("file", "push", str(HERE / "modelserve-standin.service"),
            f"{name}/etc/systemd/system/modelserve-standin.service")
        script = (f"echo {standin_sha(release)} > /opt/standin/model_sha256 && "
                  + ("touch /opt/standin/fail_readyz && " if fail_readyz else "")
                  + (f"echo '{degrade}' > /opt/standin/degrade && " if degrade else "")
                  + ("touch /opt/standin/flip && " if flip else "")
                  + "mkdir -p /etc/systemd/system/multi-user.target.wants && ln -sf "
                  "/etc/systemd/system/modelserve-standin.service "
                  "/etc/systemd/system/multi-user.target.wants/ && cloud-init clean --logs")
        lxc("exec", name, "--", "sh", "-c", script)
        lxc("stop", name)
        stamp = built_at or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        lxc("publish", name, "--alias", alias,
            f"modelserve_release={release}",
            f"modelserve_model_sha256={claimed_sha or standin_sha(release)}",
            f"modelserve_model_accuracy={accuracy}",
            "modelserve_provenance=standin", f"modelserve_accuracy_floor={accuracy_floor}",
            "modelserve_git_sha=standin", "modelserve_app_version=standin",
            f"modelserve_built_at={stamp}",
            f"standin_spec={spec}", f"description=modelserve stand-in {release}")
    finally:
        lxc("delete", "-f", name, check=False)
    return alias
