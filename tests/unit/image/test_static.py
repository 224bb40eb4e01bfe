"""Static checks of the bake: packer fmt/validate on every template, shellcheck on every script,
and the pure parts of packer/bake.py (release ids, provenance, the extra-CA input)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.usefixtures("host_tools")]
PACKER = ROOT / "packer"
SCRIPTS = sorted((ROOT / "image-scripts").glob("*.sh")) + [
    ROOT / "image-scripts" / "files" / "modelserve-firstboot",
    ROOT / "image-scripts" / "files" / "modelserve-role-is",
] + sorted((ROOT / "localcloud" / "lxd").glob("*.sh"))


def load_bake():
    spec = importlib.util.spec_from_file_location("bake", PACKER / "bake.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run `make local-cloud` (it installs it)")
    return path


def valid_vars(tmp_path: Path) -> list[str]:
    tarball = tmp_path / "inputs.tar"
    tarball.write_bytes(b"")
    return ["-var", "release=r20261126-0630-7c1bfb0", "-var", "git_sha=7c1bfb0",
            "-var", f"model_sha256={'a' * 64}", "-var", "model_accuracy=0.79",
            "-var", "built_at=2026-11-26T06:30:00Z", "-var", f"inputs_tarball={tarball}"]


@pytest.mark.parametrize("folder", ["packer", "packer/plugins"])
def test_packer_fmt_is_clean(folder):
    proc = subprocess.run([need("packer"), "fmt", "-check", "-diff", "."], cwd=ROOT / folder,
                          text=True, capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("env", sorted(p.name for p in (PACKER / "env").glob("*.pkrvars.hcl")))
def test_lxd_source_validates_for_every_environment(env, tmp_path):
    proc = subprocess.run([need("packer"), "validate", "-only=lxd.modelserve",
                           f"-var-file=env/{env}", *valid_vars(tmp_path), "."],
                          cwd=PACKER, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_whole_template_validates_syntax_only(tmp_path):
    # the openstack source logs in to Keystone on a full validate; syntax needs no cloud
    proc = subprocess.run([need("packer"), "validate", "-syntax-only", "-var-file=env/prod.pkrvars.hcl",
                           *valid_vars(tmp_path), "."], cwd=PACKER, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_validation_rejects_an_unknown_layer(tmp_path):
    proc = subprocess.run([need("packer"), "validate", "-only=lxd.modelserve",
                           *valid_vars(tmp_path), "-var", "layer=everything", "."],
                          cwd=PACKER, text=True, capture_output=True)
    assert proc.returncode != 0
    assert "layer must be one of" in proc.stdout + proc.stderr


def test_required_plugins_only_where_packer_1_6_6_does_not_look():
    top = "".join(p.read_text() for p in PACKER.glob("*.pkr.hcl"))
    assert "required_plugins" not in top
    assert "required_plugins" in (PACKER / "plugins" / "plugins.pkr.hcl").read_text()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck_clean(script):
    proc = subprocess.run([need("shellcheck"), "-x", str(script)], cwd=ROOT, text=True,
                          capture_output=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.parent.name == "image-scripts"
                                    and p.name != "lib.sh"], ids=lambda p: p.name)
def test_every_phase_is_strict_and_in_the_build_block(script):
    text = script.read_text()
    assert "set -Eeuo pipefail" in text and "lib.sh" in text
    assert f"scripts/{script.name}" in (PACKER / "build.pkr.hcl").read_text()


@pytest.mark.parametrize("release", ["r20261126-0630-7c1bfb0", "a", "rel-1", "x" * 30])
def test_release_ids_accepted(release):
    assert load_bake().check_release(release) == release


@pytest.mark.parametrize("release", ["", "R1", "-r1", "r1-", "r_1", "r.1", "x" * 31, "r 1"])
def test_release_ids_rejected(release):
    bake = load_bake()
    with pytest.raises(bake.BakeError, match="RELEASE"):
        bake.check_release(release)


def test_default_release_is_utc_time_and_short_sha():
    bake = load_bake()
    release = bake.default_release(dt.datetime(2026, 11, 26, 6, 30, tzinfo=dt.timezone.utc))
    assert release.startswith("r20261126-0630-")
    assert bake.check_release(release) == release and len(release) == 22


def test_provenance_comes_from_the_bundle(tmp_path):
    bake = load_bake()
    app = tmp_path / "app"
    shutil.copytree(ROOT / "app", app, ignore=shutil.ignore_patterns("__pycache__"))
    prov = bake.provenance(app)
    meta = json.loads((ROOT / "app" / "bundle" / "metadata.json").read_text())
    assert prov["model_sha256"] == meta["sha256"]
    assert float(prov["model_accuracy"]) == meta["metrics"]["accuracy"]
    assert dt.datetime.strptime(prov["built_at"], "%Y-%m-%dT%H:%M:%SZ")


def test_a_model_that_does_not_match_its_metadata_is_not_baked(tmp_path):
    bake = load_bake()
    app = tmp_path / "app"
    shutil.copytree(ROOT / "app", app, ignore=shutil.ignore_patterns("__pycache__"))
    with open(app / "bundle" / "model.keras", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(bake.BakeError, match="does not match metadata.json"):
        bake.provenance(app)


def test_extra_ca_input(tmp_path):
    bake = load_bake()
    assert bake.extra_ca_pem("none") == ""
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert bake.extra_ca_pem(str(pem)) == pem.read_text()
    with pytest.raises(bake.BakeError, match="no such file"):
        bake.extra_ca_pem(str(tmp_path / "missing.pem"))
    auto = bake.extra_ca_pem("auto")  # the host's certificates beyond Debian's Mozilla set
    assert auto == "" or auto.count("BEGIN CERTIFICATE") >= 1


def _repo(tmp_path: Path) -> Path:
    """A small git checkout with what the release layer is built from."""
    root = tmp_path / "repo"
    for rel, text in (("app/__init__.py", "__version__ = '1'\n"), ("requirements.txt", "x==1\n"),
                      ("constraints.txt", ""), ("requirements.lock", ""), ("image-scripts/a.sh", "true\n"),
                      ("packer/x.pkr.hcl", "")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)

    def git(*args):
        subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.email=t@example.org", "-c", "user.name=t", "commit", "-qm", "one")
    return root


def test_the_release_layer_is_git_archive_of_the_commit(tmp_path):
    bake = load_bake()
    root = _repo(tmp_path)
    (root / "app" / "untracked.py").write_text("not committed\n")  # never packed
    src, sha, dirty = bake.source_tree(tmp_path / "w", allow_dirty=False, root=root)
    assert not dirty and re.fullmatch(r"[0-9a-f]{40}", sha) and src != root
    assert (src / "app" / "__init__.py").read_text() == "__version__ = '1'\n"
    assert not (src / "app" / "untracked.py").exists()
    assert (src / "image-scripts" / "a.sh").exists() and not (src / "packer").exists()


def test_a_dirty_tree_is_refused_unless_allowed_and_then_marked(tmp_path):
    bake = load_bake()
    root = _repo(tmp_path)
    (root / "app" / "__init__.py").write_text("__version__ = '2'\n")
    with pytest.raises(bake.BakeError, match=r"uncommitted changes in app/__init__.py.*--allow-dirty"):
        bake.source_tree(tmp_path / "w", allow_dirty=False, root=root)
    src, sha, dirty = bake.source_tree(tmp_path / "w", allow_dirty=True, root=root)
    assert dirty and src == root and sha.endswith("-dirty")
    with pytest.raises(bake.BakeError, match="--scripts-dir"):  # a private scripts dir too
        bake.source_tree(tmp_path / "w2", allow_dirty=False, custom_scripts=True,
                         root=_repo(tmp_path / "clean"))
    prov = bake.provenance(ROOT / "app", sha, dirty)
    assert prov["dirty"] == "true" and prov["git_sha"] == sha
    assert bake.provenance(ROOT / "app", "a" * 40, False)["dirty"] == "false"


def test_the_bake_refuses_a_dirty_checkout_before_any_work(tmp_path):
    """`make image` in a clone with an uncommitted change: one line, exit 1, nothing baked
    (--cloud openstack without credentials: were the check missing, it still could not bake)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(clone)], check=True)
    shutil.copy2(PACKER / "bake.py", clone / "packer" / "bake.py")  # this tree's, committed
    subprocess.run(["git", "-C", str(clone), "-c", "user.email=t@example.org", "-c",
                    "user.name=t", "commit", "-qam", "this tree's bake.py", "--allow-empty"],
                   check=True, capture_output=True)
    with open(clone / "app" / "web.py", "a") as fh:
        fh.write("# local change\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    proc = subprocess.run([sys.executable, str(clone / "packer" / "bake.py"), "--cloud",
                           "openstack", "--release", "rdirty-1"], text=True,
                          capture_output=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "uncommitted changes in app/web.py" in proc.stderr and "--allow-dirty" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_deps_layer_key_changes_every_week(monkeypatch):
    bake = load_bake()
    assert bake.security_week(dt.datetime(2026, 11, 28, tzinfo=dt.timezone.utc)) == "2026-W48"
    assert bake.security_week(dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc)) == "2026-W53"
    monkeypatch.setattr(bake, "image_fingerprint", lambda alias: "base-fp")
    monkeypatch.setenv("MODELSERVE_SECURITY_WEEK", "2026-W48")
    key = bake.deps_key(ROOT / "image-scripts")
    assert key == bake.deps_key(ROOT / "image-scripts")
    monkeypatch.setenv("MODELSERVE_SECURITY_WEEK", "2026-W49")
    assert bake.deps_key(ROOT / "image-scripts") != key
    assert "upgrade_os.sh" in bake.DEPS_SCRIPTS
