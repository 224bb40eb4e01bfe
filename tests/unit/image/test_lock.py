"""requirements.lock: the image's venv pinned with the sha256 of every wheel.

The committed lock must cover requirements.txt (a freshness check that fails once a pin moves
without `make lock`); tools/lock_requirements.py turns pip's report into lock lines; the bake
refuses a stale lock in one line, downloads and installs in hash-checking mode, and keys the
wheelhouse and the deps layer on the lock."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
LOCK = ROOT / "requirements.lock"


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def locker():
    return load(ROOT / "tools" / "lock_requirements.py", "lock_requirements")


@pytest.fixture(scope="module")
def bake():
    return load(ROOT / "packer" / "bake.py", "bake_for_lock_tests")


# --- the committed lock -------------------------------------------------------------------

def test_the_lock_covers_every_pin_of_requirements_txt_with_a_hash(locker):
    """Fails when requirements.txt (or constraints.txt) moved without `make lock`."""
    text = LOCK.read_text()
    locked = locker.parse_lock(text)  # every entry name==version with >= 1 sha256, or raises
    pins = locker.parse_pins((ROOT / "requirements.txt").read_text())
    assert pins, "requirements.txt pins nothing?"
    for name, version in pins.items():
        assert name in locked, f"{name} of requirements.txt is not in requirements.lock: make lock"
        assert locked[name][0] == version, f"{name}: lock {locked[name][0]}, pin {version}"
        assert locked[name][1], name
    assert locker.problems((ROOT / "requirements.txt").read_text(),
                           (ROOT / "constraints.txt").read_text(), text) == []
    assert locker.lock_target(text) == "3.11.2"
    assert "make lock" in text.split("\n\n")[0] and "tools/lock_requirements.py" in text


def test_every_line_of_the_lock_is_a_pin_with_a_hash_or_a_comment():
    logical = LOCK.read_text().replace("\\\n", " ").splitlines()
    entries = [line for line in logical if line.strip() and not line.startswith("#")]
    assert len(entries) > len((ROOT / "requirements.txt").read_text().split("==")) - 1
    for line in entries:
        words = line.split()
        assert "==" in words[0] and len(words) >= 2, line
        assert all(w.startswith("--hash=sha256:") and len(w) == 14 + 64 for w in words[1:]), line


def test_the_bake_finds_the_committed_lock_fresh(bake):
    bake.check_lock(ROOT)  # raises BakeError when stale


# --- the generator's pure parts -----------------------------------------------------------

def entry(name, version, url, sha=None, legacy=None):
    archive = {}
    if sha:
        archive["hashes"] = {"sha256": sha}
    if legacy:
        archive["hash"] = legacy
    return {"metadata": {"name": name, "version": version},
            "download_info": {"url": url, "archive_info": archive}}


A, B, C = "a" * 64, "b" * 64, "c" * 64
REPORT = {"version": "1", "install": [
    entry("Flask", "3.1.3", "https://files.example/flask-3.1.3-py3-none-any.whl", sha=A),
    entry("tensorflow_cpu", "2.21.0",
          "https://files.example/tensorflow_cpu-2.21.0-cp311-cp311-manylinux_2_27_x86_64.whl",
          sha=B),
    entry("async-timeout", "5.0.1", "file:///w/async_timeout-5.0.1-py3-none-any.whl",
          legacy=f"sha256={C}"),  # pip < 23 reports only "hash"
]}


def test_a_report_becomes_sorted_pinned_hashed_lock_lines(locker):
    entries = locker.lock_entries(REPORT)
    assert entries == [("async-timeout", "5.0.1", [C]), ("flask", "3.1.3", [A]),
                       ("tensorflow-cpu", "2.21.0", [B])]
    text = locker.render(entries, "3.11.2")
    body = text.split("# target-python: 3.11.2\n", 1)[1]
    assert body == (f"async-timeout==5.0.1 \\\n    --hash=sha256:{C}\n"
                    f"flask==3.1.3 \\\n    --hash=sha256:{A}\n"
                    f"tensorflow-cpu==2.21.0 \\\n    --hash=sha256:{B}\n")
    assert text.startswith("# requirements.lock") and "make lock" in text
    assert locker.parse_lock(text) == {"async-timeout": ("5.0.1", [C]), "flask": ("3.1.3", [A]),
                                       "tensorflow-cpu": ("2.21.0", [B])}
    assert locker.lock_target(text) == "3.11.2"


@pytest.mark.parametrize("bad, match", [
    (entry("x", "1", "https://files.example/x-1.tar.gz", sha=A), "not a wheel"),
    (entry("x", "1", "https://files.example/x-1-py3-none-any.whl"), "no sha256"),
    (entry("x", "1", "https://files.example/x-1-py3-none-any.whl", legacy=f"md5={'0' * 32}"),
     "no sha256"),
    (entry("", "1", "https://files.example/x-1-py3-none-any.whl", sha=A), "without a name"),
])
def test_a_report_entry_the_lock_cannot_pin_is_refused(locker, bad, match):
    with pytest.raises(locker.LockError, match=match):
        locker.lock_entries({"install": [REPORT["install"][0], bad]})


def test_an_empty_report_or_a_name_twice_is_refused(locker):
    with pytest.raises(locker.LockError, match="installs nothing"):
        locker.lock_entries({"install": []})
    with pytest.raises(locker.LockError, match="twice"):
        locker.lock_entries({"install": [REPORT["install"][0], entry(
            "flask", "3.1.2", "https://files.example/flask-3.1.2-py3-none-any.whl", sha=B)]})


LOCK_TEXT = (f"# target-python: 3.11.2\nflask==3.1.3 \\\n    --hash=sha256:{A}\n"
             f"werkzeug==3.1.9 --hash=sha256:{B} --hash=sha256:{C}\n")


@pytest.mark.parametrize("requirements, constraints, lock, expect", [
    ("Flask==3.1.3\n", "Werkzeug==3.1.9\npytest==9.2.0\n", LOCK_TEXT, []),
    ("flask==3.1.4\n", "", LOCK_TEXT, ["requirements.txt pins flask==3.1.4, requirements.lock "
                                       "has 3.1.3"]),
    ("flask==3.1.3\nwaitress==3.0.2\n", "", LOCK_TEXT,
     ["requirements.txt pins waitress==3.0.2, requirements.lock lacks it"]),
    ("flask==3.1.3\n", "werkzeug==3.1.10\n", LOCK_TEXT,
     ["constraints.txt pins werkzeug==3.1.10, requirements.lock has 3.1.9"]),
    ("flask==3.1.3\n", "", LOCK_TEXT.replace("3.11.2", "3.12.3"),
     ["requirements.lock is for Python 3.12.3, the image has 3.11.2"]),
    ("flask==3.1.3\n", "", LOCK_TEXT + "waitress==3.0.2\n",
     ["requirements.lock: waitress==3.0.2 has no --hash=sha256"]),
    ("flask==3.1.3\n", "", LOCK_TEXT + "waitress==3.0.2 --hash=md5:abc\n",
     ["requirements.lock: waitress: not a --hash=sha256:<64 hex>: --hash=md5:abc"]),
    ("flask==3.1.3\n", "", LOCK_TEXT + f"waitress>=3 --hash=sha256:{A}\n",
     ["requirements.lock: not name==version: waitress>=3"]),
])
def test_freshness_problems(locker, requirements, constraints, lock, expect):
    assert locker.problems(requirements, constraints, lock, "3.11.2") == expect


# --- the bake -----------------------------------------------------------------------------

def mini_checkout(tmp_path: Path, lock_text: str | None) -> Path:
    """What bake.py needs to get as far as the lock check, outside git (--allow-dirty)."""
    root = tmp_path / "checkout"
    for rel in ("packer/bake.py", "packer/env/dev.pkrvars.hcl", "tools/lock_requirements.py",
                "app/__init__.py", "app/release_id.py", "requirements.txt", "constraints.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, root / rel)
    if lock_text is not None:
        (root / "requirements.lock").write_text(lock_text)
    return root


@pytest.mark.parametrize("how", ["missing", "a pin moved"])
def test_the_bake_refuses_a_stale_lock_in_one_line_before_any_work(tmp_path, how):
    lock = None if how == "missing" else LOCK.read_text().replace("waitress==3.0.2",
                                                                  "waitress==3.0.1")
    root = mini_checkout(tmp_path, lock)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    proc = subprocess.run([sys.executable, str(root / "packer" / "bake.py"), "--cloud",
                           "openstack", "--release", "rlock-1", "--allow-dirty"], text=True,
                          capture_output=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("make image: error: requirements.lock is out of date: run make lock")
    if how == "a pin moved":
        assert "waitress==3.0.2" in lines[0]


def test_the_lock_is_a_release_input_and_in_the_bake_inputs(bake, tmp_path):
    assert "requirements.lock" in bake.RELEASE_INPUTS  # so `git archive` carries it
    tarball = bake.prepare_inputs(tmp_path / "w", "", False, ROOT / "image-scripts")
    with tarfile.open(tarball) as tar:
        member = tar.extractfile("inputs/requirements.lock")
        assert member is not None and member.read() == LOCK.read_bytes()


def test_the_wheelhouse_and_deps_keys_change_with_the_lock(bake, tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    for name in ("requirements.txt", "constraints.txt", "requirements.lock"):
        shutil.copy2(ROOT / name, root / name)
    monkeypatch.setattr(bake, "ROOT", root)
    monkeypatch.setattr(bake, "image_fingerprint", lambda alias: "base-fp")
    monkeypatch.setenv("MODELSERVE_SECURITY_WEEK", "2026-W48")
    key, deps = bake.requirements_key(), bake.deps_key(ROOT / "image-scripts")
    lock = root / "requirements.lock"
    lock.write_text(lock.read_text().replace(LOCK.read_text().split("--hash=sha256:")[1][:64],
                                             "0" * 64))
    assert bake.requirements_key() != key
    assert bake.deps_key(ROOT / "image-scripts") != deps


def test_the_wheelhouse_is_downloaded_in_hash_checking_mode(bake, monkeypatch, tmp_path):
    """ensure_wheelhouse's pip command, recorded instead of run (the real one: tests/image)."""
    monkeypatch.setattr(bake, "WHEELHOUSE", tmp_path / "wh")
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "3.11.2\n", "")
    monkeypatch.setattr(bake, "run", fake_run)
    monkeypatch.setattr(bake.subprocess, "run", fake_run)
    bake.ensure_wheelhouse()
    download = calls[-1]
    assert download[1:4] == ["-m", "pip", "download"]
    assert "--require-hashes" in download and "--only-binary=:all:" in download
    assert download[download.index("-r") + 1] == str(ROOT / "requirements.lock")
    assert "-c" not in download
    assert (tmp_path / "wh" / f".complete-{bake.requirements_key()}").exists()


# --- hash-checking mode for real: pip refuses a tampered wheel ----------------------------

def tiny_wheel(folder: Path, payload: str) -> Path:
    """A minimal valid wheel of `lockprobe 1.0` whose module holds ``payload``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lockprobe-1.0-py3-none-any.whl"
    files = {"lockprobe.py": payload,
             "lockprobe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: lockprobe\n"
                                                 "Version: 1.0\n",
             "lockprobe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
                                              "Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{n},,\n" for n in files) + "lockprobe-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr("lockprobe-1.0.dist-info/RECORD", record)
    return path


def pip_download(lock: Path, links: Path, dest: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}
    return subprocess.run([sys.executable, "-m", "pip", "--isolated", "download",
                           "--disable-pip-version-check", "--no-index", "--find-links",
                           str(links), "--only-binary=:all:", "--require-hashes", "-r",
                           str(lock), "-d", str(dest)], text=True, capture_output=True,
                          env=env, timeout=120)


def test_a_tampered_wheel_fails_the_hash_checked_download(locker, bake, tmp_path):
    wheel = tiny_wheel(tmp_path / "index", "GOOD = True\n")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    lock = tmp_path / "requirements.lock"
    lock.write_text(locker.render([("lockprobe", "1.0", [digest])]))
    ok = pip_download(lock, tmp_path / "index", tmp_path / "out1")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out1" / wheel.name).read_bytes() == wheel.read_bytes()

    tiny_wheel(tmp_path / "index", "GOOD = False  # substituted\n")  # same name, other bytes
    bad = pip_download(lock, tmp_path / "index", tmp_path / "out2")
    assert bad.returncode != 0
    got = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert bake.hash_mismatch(bad.stderr) == (f"{wheel.name} has sha256 {got[:12]}…, the lock "
                                              f"says {digest[:12]}…")
    assert not (tmp_path / "out2" / wheel.name).exists()
    assert bake.hash_mismatch(ok.stderr) == ""
