"""`packer validate` of the openstack source logs in to the harness's Keystone (full
validate, not -syntax-only): good credentials pass, a wrong password fails."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from localcloud.openstack import config
from tests.openstack.osenv import ROOT

pytestmark = pytest.mark.openstack

VARS = {"release": "t-validate", "git_sha": "0123456789ab", "model_sha256": "a" * 64,
        "model_accuracy": "0.79", "built_at": "2026-01-01T00:00:00Z"}


def _validate(clouds_yaml, tmp_path):
    packer = shutil.which("packer")
    if packer is None:
        pytest.fail("packer is not installed (Debian package `packer`; make setup)")
    inputs = tmp_path / "inputs.tar.gz"
    inputs.write_bytes(b"")
    args = [packer, "validate", "-only=openstack.modelserve",
            *[f"-var={k}={v}" for k, v in VARS.items()], f"-var=inputs_tarball={inputs}", "."]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OS_CLIENT_CONFIG_FILE": str(
        clouds_yaml), "OS_CLOUD": config.CLOUD, "CHECKPOINT_DISABLE": "1"}
    return subprocess.run(args, cwd=ROOT / "packer", env=env, capture_output=True, text=True,
                          timeout=120)


def test_packer_validate_against_keystone(harness, tmp_path):
    if not (ROOT / "packer" / "sources.pkr.hcl").exists():
        pytest.fail("packer/sources.pkr.hcl is missing: the image tier defines the source")
    good = _validate(harness.layout.clouds_yaml, tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr

    clouds = yaml.safe_load(harness.layout.clouds_yaml.read_text())
    clouds["clouds"][config.CLOUD]["auth"]["password"] = "wrong-password"
    bad_file = tmp_path / "clouds.yaml"
    bad_file.write_text(yaml.safe_dump(clouds))
    bad = _validate(bad_file, tmp_path)
    assert bad.returncode != 0
    assert "401" in bad.stdout + bad.stderr or "auth" in (bad.stdout + bad.stderr).lower()
