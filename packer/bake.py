#!/usr/bin/env python3
"""Bake the modelserve image for one release: `make image` (LXD) / `make image CLOUD=openstack`.

LXD bakes in two layers so that a release whose dependencies did not change bakes in about a
minute:
  deps     OS packages (RabbitMQ, Redis) + the venv with TensorFlow, from the host wheelhouse.
           Alias modelserve-deps-<key>, where key hashes everything the layer is made of; reused
           while that key is unchanged.
  release  the app, the model bundle, units, hardening and clean-up on top of the deps image.
           Alias modelserve-<release>, with the provenance properties the rollout tool reads.
OpenStack (Packer's openstack source: a build server through Nova, SSH with Packer's temporary
keypair, a snapshot into Glance) layers the same way: a Glance image modelserve-deps-<key>
(baked from the Debian 12 base, os_source_image_name of the env's pkrvars) is reused while its
key is unchanged, and the release layer is baked from it.

Stdlib only (runs before any venv exists); drives the packer binary through subprocess.
Progress goes to stderr; with --json the result is printed on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

PACKER_DIR = Path(__file__).resolve().parent
ROOT = PACKER_DIR.parent
sys.path.insert(0, str(ROOT))  # app.release_id: the one release-id grammar (stdlib only)
from app.release_id import RULE as RELEASE_RULE  # noqa: E402
from app.release_id import is_release_id  # noqa: E402

SCRIPTS = ROOT / "image-scripts"
CACHE = Path(os.environ.get("MODELSERVE_CACHE", "/var/cache/modelserve"))
WHEELHOUSE = CACHE / "wheelhouse"
MANIFEST = PACKER_DIR / "manifest.json"  # every release bake's artifact (record_manifest)
BASE_ALIAS = os.environ.get("MODELSERVE_BASE_ALIAS", "modelserve-base-debian12")
BRIDGE = os.environ.get("MODELSERVE_LXD_BRIDGE", "msbr0")
POOL = os.environ.get("MODELSERVE_LXD_POOL", "default")
BAKE_PROFILE = "modelserve-bake"
TARGET_PYTHON = "3.11.2"  # Debian 12's python3: markers (python_full_version) need all of it
# What the deps layer is made of: any change here (or in the base image) bakes a new one.
DEPS_SCRIPTS = ("lib.sh", "trust_build_ca.sh", "upgrade_os.sh", "install_rabbitmq.sh",
                "create_venv.sh", "cleanup.sh")
# What the release layer is built from: `git archive` of HEAD (a dirty tree: --allow-dirty).
RELEASE_INPUTS = ("app", "requirements.txt", "constraints.txt", "requirements.lock", "image-scripts")
LOCK = "requirements.lock"  # tools/lock_requirements.py (`make lock`): pins + sha256 of every wheel
# what image-scripts/lib.sh prints: its ERR trap, and die()
FAILED_AT = re.compile(r"failed at (\S+\.sh):(\d+) \(exit (\d+)\): (.*)")
DIED = re.compile(r"\[(\S+\.sh)\] ERROR: (.*) \((\S+\.sh):(\d+)\)$")


class BakeError(Exception):
    """A bake cannot go on; the message says what happened and what to do."""


def log(msg: str) -> None:
    """One progress line on stderr."""
    print(f"{time.strftime('%H:%M:%S', time.gmtime())} [bake] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; raise BakeError naming it on failure."""
    proc = subprocess.run(cmd, text=True, capture_output=True, **kw)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BakeError(f"{' '.join(cmd[:3])}… failed (exit {proc.returncode}): {detail[0]}")
    return proc


def lxc_ok(*args: str) -> bool:
    """True when `lxc ARGS` succeeds (existence checks)."""
    return subprocess.run(["lxc", *args], capture_output=True).returncode == 0


# --- provenance -------------------------------------------------------------------------

def git(*args: str) -> str:
    """Output of a git command in the repo, '' when git or the repo is missing."""
    proc = subprocess.run(["git", "-C", str(ROOT), *args], text=True, capture_output=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def default_release(now: dt.datetime | None = None) -> str:
    """r<UTC yyyymmdd-HHMM>-<short git sha>, e.g. r20261126-0630-7c1bfb0 (22 characters)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    sha = git("rev-parse", "--short=7", "HEAD") or "nogit"
    return f"r{now:%Y%m%d-%H%M}-{sha}"


def check_release(release: str) -> str:
    """The release id, or BakeError when it is not a DNS label of at most 30 characters."""
    if not is_release_id(release):
        raise BakeError(f"RELEASE={release!r}: use {RELEASE_RULE}")
    return release


def security_week(now: dt.datetime | None = None) -> str:
    """The ISO week (``2026-W48``) whose distribution updates the deps layer carries: part of
    the layer's key, so a layer baked in an earlier week is baked again (with the week's
    security upgrades). ``MODELSERVE_SECURITY_WEEK`` pins it (benchmarks, tests)."""
    pinned = os.environ.get("MODELSERVE_SECURITY_WEEK", "").strip()
    if pinned:
        return pinned
    year, week, _ = (now or dt.datetime.now(dt.timezone.utc)).isocalendar()
    return f"{year}-W{week:02d}"


def source_tree(work: Path, *, allow_dirty: bool, custom_scripts: bool = False,
                root: Path | None = None) -> tuple[Path, str, bool]:
    """Where the release layer's files come from: (directory, git sha, dirty).

    Clean: ``git archive`` of HEAD (RELEASE_INPUTS only: nothing untracked, nothing ignored)
    unpacked under ``work``. Uncommitted changes in those paths or in packer/, no git
    checkout, or a ``--scripts-dir`` of its own: BakeError unless ``allow_dirty``, and then
    the working tree itself, the sha marked ``-dirty``."""
    root = root or ROOT

    def git_in(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(root), *args], text=True, capture_output=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    sha = git_in("rev-parse", "HEAD")
    # untracked files are not in `git archive`: they cannot make the image differ
    changed = git_in("status", "--porcelain", "--untracked-files=no", "--",
                     *RELEASE_INPUTS, "packer") if sha else ""
    why = []
    if not sha:
        why.append(f"{root} is not a git checkout")
    if changed:
        paths = [line.split(maxsplit=1)[-1] for line in changed.splitlines()]
        why.append(f"uncommitted changes in {', '.join(paths[:3])}"
                   + (f" and {len(paths) - 3} more" if len(paths) > 3 else ""))
    if custom_scripts:
        why.append("--scripts-dir is not the commit's image-scripts")
    if why:
        if not allow_dirty:
            raise BakeError(f"{'; '.join(why)}: the release layer is built from `git archive` "
                            "of a commit; commit first, or bake with --allow-dirty (make image "
                            "ALLOW_DIRTY=1), which packs the working tree and marks the image "
                            "modelserve_dirty=true")
        return root, (sha or "unknown") + ("-dirty" if sha else ""), True
    dest = work / "src"
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", sha,
                              *RELEASE_INPUTS], capture_output=True)
    if archive.returncode != 0:
        raise BakeError(f"git archive {sha[:12]} failed: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest)  # our own commit's files
    return dest, sha, False


def provenance(app_dir: Path, git_sha: str | None = None, dirty: bool | None = None
               ) -> dict[str, str]:
    """Git sha, app version, model sha256 and held-out accuracy of the tree being baked
    (``git_sha``/``dirty``: from ``source_tree``; by default read from the checkout)."""
    meta_path = app_dir / "bundle" / "metadata.json"
    model_path = app_dir / "bundle" / "model.keras"
    if not meta_path.is_file() or not model_path.is_file():
        raise BakeError(f"no model bundle in {app_dir / 'bundle'} (run `make train`)")
    meta = json.loads(meta_path.read_text())
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    if digest != meta.get("sha256"):
        raise BakeError(f"{model_path}: sha256 {digest[:12]}… does not match metadata.json "
                        f"({str(meta.get('sha256'))[:12]}…): retrain or restore the bundle")
    accuracy = meta.get("metrics", {}).get("accuracy")
    if not isinstance(accuracy, (int, float)) or not 0 <= accuracy <= 1:
        raise BakeError(f"{meta_path}: metrics.accuracy missing or not in [0, 1]")
    floor = accuracy_floor(meta, meta_path)
    match = re.search(r'__version__\s*=\s*["\']([^"\']+)', (app_dir / "__init__.py").read_text())
    sha = git_sha
    if sha is None:
        sha = git("rev-parse", "HEAD") or "unknown"
        if sha != "unknown" and git("status", "--porcelain", "--untracked-files=no", "--",
                                    *RELEASE_INPUTS, "packer"):
            sha += "-dirty"
    return {
        "git_sha": sha,
        "dirty": "true" if (sha.endswith("-dirty") or sha == "unknown"
                            if dirty is None else dirty) else "false",
        "security_week": security_week(),
        "app_version": match.group(1) if match else "0.0.0",
        "model_sha256": digest,
        "model_accuracy": f"{accuracy:g}",
        "accuracy_floor": f"{floor:g}",
        "provenance": "release",  # stand-ins (tests) say "standin"; rollout's default skips them
        "built_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def accuracy_floor(meta: dict, meta_path: Path) -> float:
    """The bundle's quality floor: metadata.json ``accuracy_floor`` or, for a bundle trained
    before it was recorded, the majority-class baseline of its held-out rows + 0.05."""
    floor = meta.get("accuracy_floor")
    if floor is None:
        labels = [r.get("true") for r in meta.get("holdout_sample") or []]
        if not labels or any(y not in (0, 1) for y in labels):
            raise BakeError(f"{meta_path}: no accuracy_floor and no held-out labels to derive it "
                            "from (retrain with `make train`)")
        floor = round(min(max(sum(labels), len(labels) - sum(labels)) / len(labels) + 0.05,
                          1.0), 4)
    if not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
        raise BakeError(f"{meta_path}: accuracy_floor not in [0, 1]")
    return float(floor)


# --- inputs -----------------------------------------------------------------------------

def extra_ca_pem(spec: str) -> str:
    """PEM text of the CA certificates to trust during the bake (never kept in the image).

    spec: 'none'; a PEM file; or 'auto' = the certificates the host trusts beyond Debian's
    Mozilla set (what a corporate or intercepting proxy adds).
    """
    if spec == "none":
        return ""
    if spec != "auto":
        path = Path(spec)
        if not path.is_file():
            raise BakeError(f"extra CA certificates: no such file {spec}")
        return path.read_text()
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if not bundle.is_file():
        return ""
    pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
    mozilla = {"".join(c.split()) for f in Path("/usr/share/ca-certificates").rglob("*.crt")
               for c in pem.findall(f.read_text(errors="replace"))}
    extra = [c for c in pem.findall(bundle.read_text()) if "".join(c.split()) not in mozilla]
    return "\n".join(extra) + ("\n" if extra else "")


def app_tarball(dest: Path, src: Path) -> None:
    """``src``/app (package + model bundle) as a tar, without caches."""
    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if "__pycache__" in info.name.split("/") or info.name.endswith(".pyc"):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info
    with tarfile.open(dest, "w") as tar:
        tar.add(src / "app", arcname="app", filter=keep)


def prepare_inputs(work: Path, extra_ca: str, with_app: bool, scripts_dir: Path,
                   src: Path | None = None) -> Path:
    """The tarball Packer uploads and unpacks as /tmp/modelserve-build/{inputs,scripts}
    (``src``: the release's files, ``source_tree``'s answer; default the checkout)."""
    src = src or ROOT
    inputs = work / "inputs"
    inputs.mkdir(parents=True)
    for name in ("requirements.txt", "constraints.txt", LOCK):
        shutil.copy2(src / name, inputs / name)
    (inputs / "extra-ca.pem").write_text(extra_ca)
    if with_app:
        app_tarball(inputs / "app.tar", src)
    tarball = work / "bake-inputs.tar"
    with tarfile.open(tarball, "w") as tar:
        tar.add(inputs, arcname="inputs")
        tar.add(scripts_dir, arcname="scripts",
                filter=lambda i: None if "__pycache__" in i.name else i)
    return tarball


def lock_module():
    """tools/lock_requirements.py (stdlib; loaded by path: bake.py runs before any venv)."""
    import importlib.util

    path = ROOT / "tools" / "lock_requirements.py"
    if not path.is_file():
        raise BakeError(f"no {path.relative_to(ROOT)} (it checks and writes {LOCK})")
    spec = importlib.util.spec_from_file_location("modelserve_lock_requirements", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def check_lock(src: Path | None = None) -> None:
    """BakeError "requirements.lock is out of date: run make lock" when ``src`` (default the
    checkout) has no requirements.lock, or one that does not pin requirements.txt's versions
    (and constraints.txt's), each with a sha256, for the image's Python."""
    mod = lock_module()
    try:
        mod.check(src or ROOT, TARGET_PYTHON)
    except mod.LockError as exc:
        raise BakeError(str(exc)) from None


def requirements_key() -> str:
    """Hash of the pinned requirements, their lock (the wheels' sha256) and the target Python."""
    h = hashlib.sha256(TARGET_PYTHON.encode())
    for name in ("requirements.txt", "constraints.txt", LOCK):
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()[:16]


def hash_mismatch(pip_stderr: str) -> str:
    """'<file> has sha256 <got>…, the lock says <expected>…' when pip refused a file in hash-checking
    mode (its "DO NOT MATCH THE HASHES" report), else ''."""
    if "DO NOT MATCH THE HASHES" not in pip_stderr:
        return ""
    what = re.search(r"^\s+(\S+)(?: from (\S+))?.*\n\s+Expected sha256 (\w+)(?:\n\s+or \S+ \w+)*"
                     r"\n\s+Got\s+(\w+)", pip_stderr, re.M)
    if not what:
        return "a downloaded file does not match its sha256 in the lock"
    name, url, expected, got = what.groups()
    return (f"{(url or name).rsplit('/', 1)[-1]} has sha256 {got[:12]}…, the lock says "
            f"{expected[:12]}…")


def ensure_wheelhouse() -> Path:
    """pip download the locked requirements once per requirements hash (TensorFlow included),
    in hash-checking mode: a wheel whose sha256 is not the one in requirements.lock (tampered
    with, or substituted by a mirror) fails the download, and so the bake."""
    stamp = WHEELHOUSE / f".complete-{requirements_key()}"
    if stamp.exists():
        return WHEELHOUSE
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    log(f"wheelhouse: pip download --require-hashes of {LOCK} into {WHEELHOUSE}")
    # pip evaluates environment markers (python_full_version < "3.11.3" pulls async-timeout)
    # with the interpreter it runs on, so download with one of the image's exact version.
    python = os.environ.get("MODELSERVE_WHEELHOUSE_PYTHON", "/usr/bin/python3")
    have = run([python, "-c", "import platform; print(platform.python_version())"]).stdout
    if have.strip() != TARGET_PYTHON:
        raise BakeError(f"{python} is Python {have.strip()}, the image has {TARGET_PYTHON}: set "
                        "MODELSERVE_WHEELHOUSE_PYTHON to a Python of that version with pip")
    cmd = [python, "-m", "pip", "download", "--disable-pip-version-check",
           "--only-binary=:all:", "--require-hashes", "-r", str(ROOT / LOCK),
           "-d", str(WHEELHOUSE)]
    for attempt in (1, 2, 3):
        proc = subprocess.run(cmd, text=True, capture_output=True)
        if proc.returncode == 0:
            break
        mismatch = hash_mismatch(proc.stderr)
        if mismatch:  # not transient: another try would fetch the same file
            raise BakeError(f"pip download --require-hashes -r {LOCK}: {mismatch}; the index "
                            "served a file that is not the locked one (tampered with or "
                            "substituted), or the lock is wrong (make lock)")
        log(f"pip download failed (try {attempt}/3): {proc.stderr.strip().splitlines()[-1:]}")
        time.sleep(3 * attempt)
    else:
        raise BakeError("pip download of the requirements failed 3 times; see the pip output")
    for whl in WHEELHOUSE.glob("*.whl"):
        whl.chmod(0o644)  # read by the unprivileged build container through a bind mount
    stamp.touch()
    return WHEELHOUSE


# --- LXD --------------------------------------------------------------------------------

def lxd_project_module():
    """localcloud/lxd/project.py (stdlib; loaded by path: bake.py runs before any venv)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "modelserve_lxd_project", ROOT / "localcloud" / "lxd" / "project.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def lxd_project() -> str:
    """MODELSERVE_LXD_PROJECT (default ``default``): where images, profiles and build
    containers go."""
    return os.environ.get("MODELSERVE_LXD_PROJECT", "").strip() or "default"


def ensure_local_cloud() -> None:
    """localcloud/lxd/up.sh: daemon, pool, bridge, base image (fast when all is there)."""
    env = {k: v for k, v in os.environ.items() if k != "LXD_CONF"}  # up.sh: default project
    proc = subprocess.run([str(ROOT / "localcloud" / "lxd" / "up.sh")], env=env)
    if proc.returncode != 0:
        raise BakeError("localcloud/lxd/up.sh failed (see above)")


def use_lxd_project(*, ensure: bool) -> None:
    """Point every `lxc` of this process and its children (packer 1.6.6's lxd builder shells
    out to `lxc`) at MODELSERVE_LXD_PROJECT: a private LXD_CONF whose `local` remote carries
    the project. ``ensure``: also set the project up (features, profile, base image)."""
    project = lxd_project()
    if project == "default":
        return
    mod = lxd_project_module()
    os.environ["LXD_CONF"] = str(mod.lxc_conf_dir(project))
    if ensure:
        try:
            mod.ensure_project(project, bridge=BRIDGE, pool=POOL, base=BASE_ALIAS)
        except (mod.ProjectError, subprocess.TimeoutExpired) as exc:
            raise BakeError(f"LXD project {project}: {exc}") from exc


def reuse_default_project_layer(alias: str) -> str | None:
    """The same deps layer, when the default project has it: copied (read-only there) into
    MODELSERVE_LXD_PROJECT, same fingerprint, in seconds instead of a bake of minutes."""
    mod = lxd_project_module()
    try:
        mod.copy_base_image(lxd_project(), alias)
    except (mod.ProjectError, subprocess.TimeoutExpired):
        return None
    log(f"deps layer {alias} copied from the default project")
    return image_fingerprint(alias)


def ensure_bake_profile(wheelhouse: Path) -> None:
    """The build container's profile: bridge NIC, root disk, read-only wheelhouse mount."""
    body = {
        "description": "modelserve image bakes (packer lxd source)",
        # Privileged build containers skip the uid remapping of the whole rootfs on create and
        # on publish (~30 s each for a TensorFlow venv); only our own scripts run in them.
        "config": {"security.privileged": "true"},
        "devices": {
            "eth0": {"type": "nic", "name": "eth0", "network": BRIDGE},
            "root": {"type": "disk", "path": "/", "pool": cow_pool() or POOL},
            "wheelhouse": {"type": "disk", "source": str(wheelhouse),
                           "path": "/mnt/wheelhouse", "readonly": "true"},
        },
    }
    have = subprocess.run(["lxc", "query",
                           f"/1.0/profiles/{BAKE_PROFILE}?project={lxd_project()}"],
                          text=True, capture_output=True)
    if have.returncode == 0:
        current = json.loads(have.stdout)
        if current.get("config") == body["config"] and current.get("devices") == body["devices"]:
            return  # the usual case; editing a profile in use by a concurrent bake would fail
    else:
        subprocess.run(["lxc", "profile", "create", BAKE_PROFILE], capture_output=True)
    for attempt in range(1, 31):
        proc = subprocess.run(["lxc", "profile", "edit", BAKE_PROFILE], input=json.dumps(body),
                              text=True, capture_output=True)
        if proc.returncode == 0:
            return
        if "busy" not in proc.stderr or attempt == 30:
            raise BakeError(f"lxc profile edit {BAKE_PROFILE} failed: {proc.stderr.strip()}")
        time.sleep(2)  # a concurrent bake is creating its build container


def image_fingerprint(alias: str) -> str | None:
    """Fingerprint of the image with this alias, or None."""
    proc = subprocess.run(["lxc", "image", "list", alias, "--format", "json"],
                          text=True, capture_output=True)
    if proc.returncode != 0:
        return None
    for img in json.loads(proc.stdout or "[]"):
        if any(a.get("name") == alias for a in img.get("aliases") or []):
            return img["fingerprint"]
    return None


def deps_key(scripts_dir: Path, salt: str = "", base: str | None = None) -> str:
    """Hash of everything the deps layer is made of, base image included (``base``: its
    identity; default the local cloud's LXD base image fingerprint)."""
    h = hashlib.sha256(salt.encode())
    h.update(requirements_key().encode())
    for name in DEPS_SCRIPTS:
        h.update(name.encode() + (scripts_dir / name).read_bytes())
    for hcl in sorted(PACKER_DIR.glob("*.pkr.hcl")):
        h.update(hcl.name.encode() + hcl.read_bytes())
    h.update((base if base is not None else image_fingerprint(BASE_ALIAS) or "no-base").encode())
    h.update(security_week().encode())  # a week later: baked again, with that week's updates
    return h.hexdigest()[:16]


def prune_deps_images(keep: str, spare: int = 1) -> None:
    """Delete superseded deps images, sparing the newest `spare` besides the current one."""
    proc = subprocess.run(["lxc", "image", "list", "modelserve-deps-", "--format", "json"],
                          text=True, capture_output=True)
    if proc.returncode != 0:
        return
    old = sorted((img for img in json.loads(proc.stdout or "[]")
                  if img.get("properties", {}).get("modelserve_deps_key")
                  and not any(a.get("name") == keep for a in img.get("aliases") or [])),
                 key=lambda img: img.get("created_at", ""), reverse=True)
    for img in old[spare:]:
        log(f"pruning superseded deps image {img['fingerprint'][:12]}")
        subprocess.run(["lxc", "image", "delete", img["fingerprint"]], capture_output=True)


@contextlib.contextmanager
def file_lock(name: str):
    """An exclusive flock under /run/lock, so concurrent bakes do not bake the same layer."""
    path = Path("/run/lock") / f"{name}.lock"
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def cow_pool() -> str | None:
    """The local cloud's copy-on-write pool (localcloud/lxd/up.sh), when it exists and
    MODELSERVE_LXD_POOL does not name another: build containers clone their source layer
    there, and a release is warmed on it (``warm_on_cow_pool``)."""
    if os.environ.get("MODELSERVE_LXD_POOL"):
        return None
    name = lxd_project_module().cow_pool_name()
    return name if lxc_ok("storage", "show", name) else None


def warm_on_cow_pool(image: str) -> float | None:
    """Unpack the new release once into its image volume on the copy-on-write pool, by
    creating (never starting) a container and deleting it: LXD keeps the volume while the
    image exists, so every deploy's launch is a ~1 s clone, not a 12-30 s unpack. Seconds
    taken, or None without such a pool; a failure is a warning (the deploy unpacks then)."""
    pool = cow_pool()
    if pool is None:
        return None
    name = f"modelserve-warm-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    t0 = time.monotonic()
    try:
        proc = subprocess.run(["lxc", "init", image, name, "-s", pool], capture_output=True,
                              text=True, timeout=900)
        if proc.returncode:
            log(f"warning: could not warm {image} on {pool}: {proc.stderr.strip()}")
            return None
    finally:
        subprocess.run(["lxc", "delete", "--force", name], capture_output=True)
    took = round(time.monotonic() - t0, 1)
    log(f"{image} warmed on the copy-on-write pool {pool} ({took} s): launches clone it")
    return took


def remove_container(name: str) -> None:
    """Force-delete a (stale) build container; quiet when it does not exist."""
    if lxc_ok("info", name):
        log(f"removing build container {name}")
        subprocess.run(["lxc", "delete", "--force", name], capture_output=True)


# --- packer -----------------------------------------------------------------------------

def packer_build(only: str, variables: dict[str, str], var_file: Path, manifest: Path) -> str:
    """Run `packer build` for one source; stream its output; return the artifact id."""
    cmd = ["packer", "build", "-color=false", f"-only={only}", f"-var-file={var_file}",
           f"-var=manifest_path={manifest}"]
    cmd += [f"-var={k}={v}" for k, v in variables.items()]
    cmd.append(".")
    failed_at = None
    proc = subprocess.Popen(cmd, cwd=PACKER_DIR, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            sys.stderr.write(line)
            match = FAILED_AT.search(line)
            if match and failed_at is None:
                script, lineno, code, command = match.groups()
                failed_at = f"{script} failed at line {lineno} (exit {code}): {command.strip()}"
            match = DIED.search(line.rstrip())
            if match and failed_at is None:
                _, message, script, lineno = match.groups()
                failed_at = f"{script} failed at line {lineno}: {message}"
        rc = proc.wait()
    except KeyboardInterrupt:
        # packer cleans up (build container, no publish) on SIGINT; give it the time to.
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
        raise
    if rc != 0:
        if failed_at:
            raise BakeError(f"provisioner {failed_at}")
        raise BakeError(f"packer build -only={only} failed (exit {rc}); see the output above")
    data = json.loads(manifest.read_text())
    last = [b for b in data["builds"] if b.get("packer_run_uuid") == data.get("last_run_uuid")]
    if not last:
        raise BakeError(f"{manifest}: no artifact recorded for the last run")
    return str(last[-1]["artifact_id"])


def record_manifest(run: Path) -> None:
    """Add one bake's manifest (its own file, so that bakes side by side each read back their
    own artifact) to packer/manifest.json, the record of what was built, under a lock."""
    into = MANIFEST
    with file_lock("modelserve-packer-manifest"):
        try:
            data = json.loads(into.read_text())
        except (OSError, ValueError):
            data = {}
        new = json.loads(run.read_text())
        data["builds"] = list(data.get("builds") or []) + list(new.get("builds") or [])
        data["last_run_uuid"] = new.get("last_run_uuid")
        tmp = into.with_name(f".{into.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, into)


def bake_lxd(args, release: str, prov: dict[str, str], work: Path) -> dict:
    """Deps layer (reused when unchanged) then the release layer, on the local LXD cloud."""
    image = f"modelserve-{release}"
    use_lxd_project(ensure=False)
    existing = image_fingerprint(image)
    if existing:
        raise BakeError(f"{image} already exists (fingerprint {existing[:12]}): images are "
                        f"immutable; choose another RELEASE or `lxc image delete {image}`")
    if not args.skip_local_cloud:
        ensure_local_cloud()
    use_lxd_project(ensure=True)
    wheelhouse = ensure_wheelhouse()
    ensure_bake_profile(wheelhouse)
    extra_ca = extra_ca_pem(args.extra_ca_certs)
    var_file = PACKER_DIR / "env" / f"{args.env}.pkrvars.hcl"
    common = {"release": release, **prov, "env_name": args.env}
    result = {"cloud": "lxd", "image": image, "release": release, **prov}

    key = deps_key(args.scripts_dir, args.deps_salt)
    deps_alias = f"modelserve-deps-{key}"
    with file_lock(f"modelserve-bake-{deps_alias}"):
        deps_fp = image_fingerprint(deps_alias)
        if deps_fp is None and lxd_project() != "default" and not args.rebuild_deps:
            deps_fp = reuse_default_project_layer(deps_alias)
        t0 = time.monotonic()
        if deps_fp and not args.rebuild_deps:
            log(f"deps layer {deps_alias} unchanged: reused")
            result["deps_reused"] = True
        else:
            if deps_fp:
                run(["lxc", "image", "delete", deps_alias])
            log(f"baking deps layer {deps_alias} (OS packages + venv) from {BASE_ALIAS}")
            remove_container(f"packer-{deps_alias}")
            inputs = prepare_inputs(work / "deps", extra_ca, False, args.scripts_dir)
            try:
                deps_fp = packer_build("lxd.modelserve", {
                    **common, "layer": "deps", "deps_key": key, "release": f"deps-{key[:12]}",
                    "lxd_source_image": BASE_ALIAS, "lxd_output_image": deps_alias,
                    "inputs_tarball": str(inputs)}, var_file, work / "manifest-deps.json")
            finally:
                remove_container(f"packer-{deps_alias}")
            result["deps_reused"] = False
            if not args.deps_salt:  # a benchmark's private layer supersedes nothing
                prune_deps_images(keep=deps_alias)
        result["deps_seconds"] = round(time.monotonic() - t0, 1)
    result["deps_image"] = deps_alias
    result["deps_fingerprint"] = deps_fp
    if args.deps_only:
        result.update(image=deps_alias, fingerprint=deps_fp, size_bytes=image_size(deps_fp))
        return result

    t0 = time.monotonic()
    log(f"baking release layer {image} on {deps_alias}")
    remove_container(f"packer-{image}")
    inputs = prepare_inputs(work / "release", extra_ca, True, args.scripts_dir, args.src)
    manifest = work / "manifest-release.json"
    try:
        fingerprint = packer_build("lxd.modelserve", {
            **common, "layer": "release", "lxd_source_image": deps_alias,
            "inputs_tarball": str(inputs)}, var_file, manifest)
    finally:
        remove_container(f"packer-{image}")  # packer removes it; make sure, even on Ctrl-C
    record_manifest(manifest)
    result["release_seconds"] = round(time.monotonic() - t0, 1)
    result["warm_seconds"] = warm_on_cow_pool(image)
    result["fingerprint"] = fingerprint
    result["size_bytes"] = image_size(fingerprint)
    return result


def image_size(fingerprint: str) -> int | None:
    """Size of the published (compressed) LXD image in bytes."""
    proc = subprocess.run(["lxc", "query",
                           f"/1.0/images/{fingerprint}?project={lxd_project()}"], text=True,
                          capture_output=True)
    return json.loads(proc.stdout).get("size") if proc.returncode == 0 else None


def pkrvar(var_file: Path, name: str, default: str) -> str:
    """A string variable of an env's pkrvars file (``name = "value"``), else ``default``."""
    match = re.search(rf'^\s*{name}\s*=\s*"([^"]*)"', var_file.read_text(), re.M)
    return match.group(1) if match else default


def openstack_connect():
    """An openstacksdk connection from OS_CLOUD (clouds.yaml) or the OS_* variables."""
    if not (os.environ.get("OS_CLOUD") or os.environ.get("OS_AUTH_URL")):
        raise BakeError("CLOUD=openstack needs OS_CLOUD (clouds.yaml) or OS_AUTH_URL and the "
                        "other OS_* variables in the environment")
    try:
        import openstack  # the project venv's (requirements-rollout.txt); Packer needs none
        import openstack.exceptions
    except ImportError:
        raise BakeError("CLOUD=openstack looks up Glance images with openstacksdk: run "
                        "`make image CLOUD=openstack` (the project venv) or .venv/bin/python "
                        "packer/bake.py") from None
    try:
        conn = openstack.connect()
        conn.authorize()
    except openstack.exceptions.SDKException as exc:
        raise BakeError(f"OpenStack: {exc}") from None
    return conn


def glance_image(conn, name: str, visibility: str | None = None, **props: str):
    """The newest active Glance image with this name (and visibility, and properties), or None."""
    query = {"name": name, "status": "active"}
    if visibility:
        query["visibility"] = visibility
    found = [img for img in conn.image.images(**query)
             if all((img.properties or {}).get(k) == v for k, v in props.items())]
    return max(found, key=lambda img: img.created_at or "", default=None)


def openstack_deps(conn, args, var_file: Path) -> tuple[str, str, object]:
    """(deps key, deps image name, base image): the key hashes the deps layer's recipe and the
    Glance base image (id and checksum), so a new base image bakes a new layer."""
    base_name = pkrvar(var_file, "os_source_image_name", "debian-12")
    visibility = pkrvar(var_file, "os_source_image_visibility", "public")
    base = glance_image(conn, base_name, visibility)
    if base is None:
        raise BakeError(f"no active {visibility} Glance image {base_name!r} to bake from "
                        f"(os_source_image_name in packer/env/{args.env}.pkrvars.hcl)")
    key = deps_key(args.scripts_dir, args.deps_salt, f"glance:{base.id}:{base.checksum}")
    return key, f"modelserve-deps-{key}", base


def bake_openstack(args, release: str, prov: dict[str, str], work: Path) -> dict:
    """Deps layer (a Glance image, reused when unchanged) then the release layer, each a real
    Packer openstack build: a server booted through Nova, provisioned over SSH, snapshotted
    into Glance. Credentials from OS_CLOUD or OS_*."""
    conn = openstack_connect()
    var_file = PACKER_DIR / "env" / f"{args.env}.pkrvars.hcl"
    image = f"modelserve-{release}"
    if not args.deps_only and glance_image(conn, image) is not None:
        raise BakeError(f"Glance image {image} already exists: images are immutable; choose "
                        "another RELEASE")
    key, deps_name, base = openstack_deps(conn, args, var_file)
    extra_ca = extra_ca_pem(args.extra_ca_certs)
    common = {"release": release, **prov, "env_name": args.env}
    result = {"cloud": "openstack", "image": image, "release": release, **prov,
              "base_image": base.name, "deps_image": deps_name}
    t0 = time.monotonic()
    deps = None if args.rebuild_deps else glance_image(conn, deps_name,
                                                        modelserve_deps_key=key)
    if deps is not None:
        log(f"deps layer {deps_name} unchanged: reused (Glance image {deps.id})")
        result["deps_reused"] = True
    else:
        log(f"baking deps layer {deps_name} (OS packages + venv) from {base.name} through Nova")
        inputs = prepare_inputs(work / "deps", extra_ca, False, args.scripts_dir)
        packer_build("openstack.modelserve", {
            **common, "layer": "deps", "deps_key": key, "release": f"deps-{key[:12]}",
            "lxd_output_image": deps_name, "inputs_tarball": str(inputs)},
            var_file, work / "manifest-deps.json")
        deps = glance_image(conn, deps_name, modelserve_deps_key=key)
        if deps is None:
            raise BakeError(f"Packer reported success but Glance has no active {deps_name}")
        result["deps_reused"] = False
    result["deps_seconds"] = round(time.monotonic() - t0, 1)
    result["deps_image_id"] = deps.id
    if args.deps_only:
        result.update(image=deps_name, fingerprint=deps.id)
        return result

    t0 = time.monotonic()
    log(f"baking release layer {image} on {deps_name} through Nova")
    inputs = prepare_inputs(work / "release", extra_ca, True, args.scripts_dir, args.src)
    image_id = packer_build("openstack.modelserve", {
        **common, "layer": "release", "os_source_image_name": deps_name,
        "os_source_image_visibility": deps.visibility, "inputs_tarball": str(inputs)},
        var_file, work / "manifest-release.json")
    record_manifest(work / "manifest-release.json")
    result["release_seconds"] = round(time.monotonic() - t0, 1)
    result["fingerprint"] = result["image_id"] = image_id
    result["size_bytes"] = conn.image.get_image(image_id).size
    return result


def print_deps_key(args) -> dict:
    """What the deps layer of this bake would be (no bake): key, image name, base."""
    var_file = PACKER_DIR / "env" / f"{args.env}.pkrvars.hcl"
    if args.cloud == "openstack":
        key, name, base = openstack_deps(openstack_connect(), args, var_file)
        return {"cloud": "openstack", "deps_key": key, "deps_image": name,
                "base_image": base.name, "base_image_id": base.id}
    use_lxd_project(ensure=False)
    key = deps_key(args.scripts_dir, args.deps_salt)
    return {"cloud": "lxd", "deps_key": key, "deps_image": f"modelserve-deps-{key}",
            "base_image": BASE_ALIAS}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; the only place that turns errors into a message and an exit status."""
    parser = argparse.ArgumentParser(prog="packer/bake.py", description=__doc__.splitlines()[0])
    parser.add_argument("--cloud", choices=("lxd", "openstack"), default="lxd")
    parser.add_argument("--release", default="", help="release id (default: r<UTC time>-<sha>)")
    parser.add_argument("--env", default=os.environ.get("MODELSERVE_ENV", "dev"),
                        help="packer/env/<ENV>.pkrvars.hcl (default dev)")
    parser.add_argument("--extra-ca-certs", default=os.environ.get("EXTRA_CA_CERTS", "auto"),
                        help="PEM file of CAs to trust during the bake, 'auto' or 'none'")
    parser.add_argument("--scripts-dir", type=Path, default=SCRIPTS,
                        help="image-scripts directory (tests point it at a broken copy)")
    parser.add_argument("--rebuild-deps", action="store_true",
                        help="bake the deps layer again even when it is unchanged")
    parser.add_argument("--deps-salt", default="",
                        help="bake a private deps layer (benchmarks), leaving the shared one alone")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="bake the working tree as it is (uncommitted changes, a private "
                             "--scripts-dir); the image is marked modelserve_dirty=true")
    parser.add_argument("--deps-only", action="store_true",
                        help="bake (or reuse) the deps layer only; the result names it")
    parser.add_argument("--print-deps-key", action="store_true",
                        help="print the deps layer's key and image name as JSON; bake nothing")
    parser.add_argument("--skip-local-cloud", action="store_true",
                        help="do not run localcloud/lxd/up.sh first")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    args = parser.parse_args(argv)
    # Ctrl-C must stop a bake even when it was started with SIGINT ignored (a background job,
    # CI): Python installs no handler then, so install it here
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    try:
        if not (PACKER_DIR / "env" / f"{args.env}.pkrvars.hcl").is_file():
            raise BakeError(f"no packer/env/{args.env}.pkrvars.hcl (ENV={args.env})")
        release = check_release(args.release or default_release())
        custom_scripts = args.scripts_dir.resolve() != SCRIPTS.resolve()
        with tempfile.TemporaryDirectory(prefix="modelserve-bake-") as tmp:
            args.src, sha, dirty = source_tree(Path(tmp), allow_dirty=args.allow_dirty,
                                               custom_scripts=custom_scripts)
            check_lock(args.src)  # the venv installs from it with --require-hashes
            prov = provenance(args.src / "app", sha, dirty)
            if not custom_scripts:
                args.scripts_dir = args.src / "image-scripts"
            args.scripts_dir = args.scripts_dir.resolve()
            log(f"release {release}: git {prov['git_sha'][:12]}"
                + (" (DIRTY: working tree, --allow-dirty)" if dirty else " (git archive)")
                + f", app {prov['app_version']}, model {prov['model_sha256'][:12]} (accuracy "
                f"{prov['model_accuracy']}, floor {prov['accuracy_floor']}), OS updates of "
                f"{prov['security_week']}")
            if args.print_deps_key:
                print(json.dumps(print_deps_key(args), indent=1))
                return 0
            if shutil.which("packer") is None:
                raise BakeError("packer is not installed (apt-get install packer, or make "
                                "local-cloud)")
            bake = bake_openstack if args.cloud == "openstack" else bake_lxd
            result = bake(args, release, prov, Path(tmp))
    except BakeError as exc:
        print(f"make image: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("make image: interrupted; build container removed, nothing published",
              file=sys.stderr)
        return 130
    result["total_seconds"] = round(time.monotonic() - started, 1)
    size = result.get("size_bytes")
    log(f"bake time {result['total_seconds']:.0f} s"
        + (f" (deps {'reused' if result.get('deps_reused') else 'baked'} in "
           f"{result['deps_seconds']:.0f} s"
           + (f", release layer {result['release_seconds']:.0f} s)"
              if "release_seconds" in result else ")")
           if "deps_seconds" in result else "")
        + (f", image {size / 2**20:.0f} MiB" if size else ""))
    print(f"image {result['image']} fingerprint {result['fingerprint']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
