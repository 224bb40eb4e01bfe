"""The LXD project modelserve works in (``MODELSERVE_LXD_PROJECT``, default ``default``).

Stdlib only: used by packer/bake.py (before any venv exists), the test suite and bench/.

A non-default project is set up idempotently by ``ensure_project``:

* ``features.images=true``, ``features.profiles=true`` (its own images and profiles; storage
  volumes and networks are the default project's: the pool and the bridge ``msbr0`` are shared);
* its ``default`` profile: ``root`` disk on the local pool, ``eth0`` on the bridge;
* the local-cloud base image (``modelserve-base-debian12``), copied from the default project
  with ``lxc image copy --mode relay --target-project`` (same fingerprint; about a second).

``lxc`` itself (and so packer 1.6.6's lxd builder, which shells out to it) is pointed at the
project by ``lxc_env``: a private ``LXD_CONF`` directory whose ``config.yml`` sets the ``local``
remote's ``project``.

CLI: ``python3 -m localcloud.lxd.project ensure [PROJECT]`` / ``lxc-conf [PROJECT]`` (prints
the LXD_CONF directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = "default"
TEST_PROJECT = "modelserve-test"


def project_name() -> str:
    """MODELSERVE_LXD_PROJECT, default ``default``."""
    return os.environ.get("MODELSERVE_LXD_PROJECT", "").strip() or DEFAULT


def bridge_name() -> str:
    return os.environ.get("MODELSERVE_LXD_BRIDGE", "msbr0")


def pool_name() -> str:
    return os.environ.get("MODELSERVE_LXD_POOL", "default")


def cow_pool_name() -> str:
    """The copy-on-write pool up.sh makes where btrfs and loop devices allow
    (MODELSERVE_LXD_COW_POOL, default ``modelserve-cow``); it may not exist."""
    return os.environ.get("MODELSERVE_LXD_COW_POOL", "").strip() or "modelserve-cow"


def base_alias() -> str:
    return os.environ.get("MODELSERVE_BASE_ALIAS", "modelserve-base-debian12")


class ProjectError(RuntimeError):
    """The project cannot be set up; the message says why."""


def _lxc(*args: str, check: bool = True, timeout: float = 300, input: str | None = None,
         ) -> subprocess.CompletedProcess:
    # never with a private LXD_CONF: every call here names its project explicitly
    env = {k: v for k, v in os.environ.items() if k != "LXD_CONF"}
    proc = subprocess.run(["lxc", *args], capture_output=True, text=True, timeout=timeout,
                          input=input, env=env, check=False)
    if check and proc.returncode:
        raise ProjectError(f"lxc {' '.join(args[:4])}: {proc.stderr.strip() or proc.stdout}")
    return proc


def query(path: str, *, method: str = "GET", data: object = None, check: bool = True):
    """``lxc query`` (raw API; the path names its project): parsed JSON or None."""
    args = ["query", "-X", method, path]
    if data is not None:
        args += ["-d", json.dumps(data)]
    proc = _lxc(*args, check=check, timeout=120)
    if proc.returncode:
        return None
    out = proc.stdout.strip()
    return json.loads(out) if out else None


def _alias_target(alias: str, project: str) -> str | None:
    got = query(f"/1.0/images/aliases/{alias}?project={project}", check=False)
    return (got or {}).get("target")


@contextlib.contextmanager
def _flock(name: str):
    path = Path("/run/lock") if Path("/run/lock").is_dir() else Path(tempfile.gettempdir())
    with open(path / f"modelserve-{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def profile_body(bridge: str, pool: str) -> dict:
    return {"description": "modelserve: root disk on the local pool, eth0 on the bridge",
            "config": {},
            "devices": {"eth0": {"type": "nic", "name": "eth0", "network": bridge},
                        "root": {"type": "disk", "path": "/", "pool": pool}}}


def ensure_project(project: str | None = None, *, bridge: str | None = None,
                   pool: str | None = None, base: str | None = None,
                   with_base: bool = True) -> str:
    """Create/repair the project (see module doc); a no-op for ``default``. Returns its name."""
    project = project or project_name()
    if project == DEFAULT:
        return project
    bridge, pool, base = bridge or bridge_name(), pool or pool_name(), base or base_alias()
    with _flock(f"lxd-project-{project}"):
        have = query(f"/1.0/projects/{project}", check=False)
        want = {"features.images": "true", "features.profiles": "true",
                "features.storage.volumes": "false", "features.networks": "false"}
        if have is None:
            query("/1.0/projects", method="POST", data={
                "name": project, "config": want,
                "description": "modelserve: isolated images, profiles and instances"})
        elif any((have.get("config") or {}).get(k) != v for k, v in want.items()):
            raise ProjectError(f"LXD project {project} exists with other features "
                               f"({have.get('config')}); want {want}")
        prof = query(f"/1.0/profiles/default?project={project}")
        body = profile_body(bridge, pool)
        if (prof or {}).get("devices") != body["devices"]:
            query(f"/1.0/profiles/default?project={project}", method="PUT", data=body)
        if with_base:
            copy_base_image(project, base)
    return project


def copy_base_image(project: str, base: str) -> None:
    """The default project's base image, same fingerprint and alias, in ``project``."""
    src = _alias_target(base, DEFAULT)
    if src is None:
        raise ProjectError(f"no base image {base} in the default project: run "
                           "`make local-cloud` (localcloud/lxd/up.sh)")
    dst = _alias_target(base, project)
    if dst == src:
        return
    if dst is not None:  # the base was rebuilt: drop the project's stale copy
        _lxc("image", "delete", dst, "--project", project, check=False)
        _lxc("image", "alias", "delete", base, "--project", project, check=False)
    # 5.0.2: a same-server copy needs --mode relay (pull: "isn't listening on the network")
    _lxc("image", "copy", src, "local:", "--project", DEFAULT, "--target-project", project,
         "--mode", "relay", "--alias", base, timeout=900)
    if _alias_target(base, project) != src:
        raise ProjectError(f"copying base image {base} into project {project} did not take")


def lxc_conf_dir(project: str | None = None) -> Path:
    """A private LXD_CONF whose ``local`` remote (the unix socket) uses ``project``."""
    project = project or project_name()
    root = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    conf = root / f"modelserve-lxc-{os.getuid()}-{project}"
    text = ("default-remote: local\nremotes:\n  local:\n    addr: unix://\n"
            f"    public: false\n    project: {project}\naliases: {{}}\n")
    cfg = conf / "config.yml"
    if not cfg.is_file() or cfg.read_text() != text:
        conf.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = conf / f".config.yml.{os.getpid()}.{time.monotonic_ns()}"
        tmp.write_text(text)
        os.replace(tmp, cfg)
    return conf


def lxc_env(project: str | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment in which ``lxc`` (and packer) works in ``project``."""
    env = dict(os.environ if base is None else base)
    project = project or project_name()
    env["MODELSERVE_LXD_PROJECT"] = project
    if project == DEFAULT:
        return env
    env["LXD_CONF"] = str(lxc_conf_dir(project))
    return env


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("ensure", "lxc-conf"):
        print("usage: python3 -m localcloud.lxd.project ensure|lxc-conf [PROJECT]",
              file=sys.stderr)
        return 2
    project = argv[1] if len(argv) > 1 else project_name()
    try:
        if argv[0] == "ensure":
            ensure_project(project)
            print(project)
        else:
            print(lxc_conf_dir(project))
    except (ProjectError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
