"""The openstack source against a real Keystone (the project's OpenStack harness): a full
`packer validate` logs in with the clouds.yaml credentials, and wrong ones are refused."""

from __future__ import annotations

import os
import subprocess

import pytest

from tools.openstack import config
from tools.openstack.harness import Harness, HarnessError

from .conftest import ROOT
from .test_static import need, valid_vars

# the harness connects with openstacksdk, which warns about its own deprecations on connect
pytestmark = [pytest.mark.image, pytest.mark.openstack, pytest.mark.usefixtures("host_tools")] + [
    pytest.mark.filterwarnings(f"ignore::openstack.warnings.{category}")
    for category in ("OpenStackDeprecationWarning", "RemovedInSDK50Warning",
                     "RemovedInSDK60Warning")]


@pytest.fixture(scope="module")
def clouds_yaml():
    """The harness's clouds.yaml; the control plane is started here (and stopped) if needed."""
    h = Harness()
    was_running = all(h.status().values())
    try:
        h.up()
    except HarnessError as exc:
        pytest.fail(f"the OpenStack harness did not come up: {exc}")
    yield h.layout.clouds_yaml
    if not was_running and os.environ.get("MODELSERVE_OS_KEEP") != "1":
        h.down()


def validate(clouds, tmp_path):
    env = {**os.environ, "OS_CLIENT_CONFIG_FILE": str(clouds), "OS_CLOUD": config.CLOUD}
    return subprocess.run([need("packer"), "validate", "-only=openstack.modelserve",
                           "-var-file=env/prod.pkrvars.hcl", *valid_vars(tmp_path), "."],
                          cwd=ROOT / "packer", env=env, text=True, capture_output=True,
                          timeout=300)


def test_openstack_source_validates_against_keystone(clouds_yaml, tmp_path):
    proc = validate(clouds_yaml, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_wrong_credentials_fail_validation(clouds_yaml, tmp_path):
    bad = tmp_path / "clouds.yaml"
    bad.write_text("\n".join(
        line.split("password:")[0] + "password: not-the-password" if "password:" in line
        else line for line in clouds_yaml.read_text().splitlines()))
    proc = validate(bad, tmp_path)
    assert proc.returncode != 0
    assert "Authentication failed" in proc.stdout + proc.stderr
