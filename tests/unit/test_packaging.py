"""`pip install .` gives the deploy tool as a command: the wheel built from this tree names the
console script ``modelserve-rollout = rollout.cli:main``, carries the files the tool reads at run
time (the NoCloud templates), and, installed into a throwaway venv, ``modelserve-rollout
--version`` names the project version.

Offline: the wheel is built with the shared venv's setuptools (``--no-build-isolation``), from a
copy of the tree (so no build/ or *.egg-info lands in the shared working tree). The throwaway
venv is made from the shared venv's Python, whose "system" site-packages is the base
interpreter's, without the tool's dependencies; so the venv gets a ``.pth`` naming the shared
venv's site-packages (the dependencies only: ``rollout`` must come from the wheel, checked)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "requirements-rollout.txt", "app", "rollout", "nocloud")


def project_version() -> str:
    """The one source of truth (pyproject's dynamic version reads it)."""
    text = (ROOT / "app" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], text=True, capture_output=True, timeout=300,
                          **kw)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-w", out, "."], cwd=src)
    wheels = list(out.glob("modelserve-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_declares_the_console_script_and_the_version(wheel):
    assert wheel.name == f"modelserve-{project_version()}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"modelserve-{project_version()}.dist-info"
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        metadata = zf.read(f"{info}/METADATA").decode()
    assert re.search(r"^\[console_scripts\]\nmodelserve-rollout = rollout\.cli:main$",
                     entry_points, re.M), entry_points
    assert re.search(rf"^Version: {re.escape(project_version())}$", metadata, re.M)
    # the tool's pins are the wheel's dependencies (one list: requirements-rollout.txt)
    pins = [line for line in (ROOT / "requirements-rollout.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins and all(f"Requires-Dist: {pin}" in metadata for pin in pins), metadata
    # what the tool reads at run time, beside its code
    assert {"rollout/cli.py", "rollout/__main__.py", "rollout/clouds/lxd.py",
            "app/release_id.py", "nocloud/user-data.yaml", "nocloud/instance.env.tmpl",
            "nocloud/meta-data.tmpl"} <= names
    assert not any(n.startswith(("tests/", "bench/", "devtools/")) for n in names)


def test_installed_command_runs_from_the_wheel(wheel, tmp_path):
    target = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(target)
    py = target / "bin" / "python"
    purelib = run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout
    # the tool's dependencies (rich, pylxd, openstacksdk…) from the shared venv, offline
    (Path(purelib.strip()) / "shared-venv-deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", "-q", wheel])
    cwd = tmp_path / "elsewhere"  # not the repo: nothing imports from the working tree
    cwd.mkdir()
    script = target / "bin" / "modelserve-rollout"
    assert script.is_file()
    proc = run([script, "--version"], cwd=cwd)
    assert proc.stdout == f"modelserve-rollout {project_version()}\n"
    assert run([py, "-m", "rollout", "--version"], cwd=cwd).stdout == proc.stdout
    # the code, and the NoCloud templates it reads, come from the installed wheel
    where = run([py, "-c", "import rollout.cli, rollout.seed as s; print(rollout.cli.__file__); "
                 "print(s.render_meta_data('i-1', 'h-1'))"], cwd=cwd).stdout
    assert where.startswith(str(target)), where
    assert "i-1" in where
    # a usage error: one line, exit 2, before any cloud call
    bad = subprocess.run([str(script), "deploy", "--workers", "-1"], cwd=cwd, text=True,
                         capture_output=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") \
        and len(bad.stderr.splitlines()) == 1, bad.stderr
