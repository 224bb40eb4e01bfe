"""The NoCloud seed: rendered values, escaping, and `cloud-init schema` on every variant."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from rollout.seed import (
    Credentials,
    SeedParams,
    parse_user_data,
    render_meta_data,
    render_user_data,
)

CONTRACT_KEYS = {
    "MODELSERVE_ROLE", "MODELSERVE_COLOUR", "MODELSERVE_RELEASE", "MODELSERVE_DEPLOY_ID",
    "MODELSERVE_ENV", "MODELSERVE_BROKER_USER", "MODELSERVE_BROKER_PASSWORD",
    "MODELSERVE_BROKER_VHOST", "MODELSERVE_BROKER_URL", "MODELSERVE_REDIS_PASSWORD",
    "MODELSERVE_RESULT_URL", "MODELSERVE_BROKER_BIND", "MODELSERVE_PORT",
    "MODELSERVE_WORKER_CONCURRENCY",
}
VARIANTS = [
    dict(role="front", colour="blue", broker_host="127.0.0.1", broker_bind="127.0.0.1"),
    dict(role="front", colour="green", broker_host="127.0.0.1", broker_bind="0.0.0.0"),
    dict(role="worker", colour="green", broker_host="10.77.0.12", broker_bind="127.0.0.1"),
]


def params(**kw) -> SeedParams:
    base = dict(role="front", colour="blue", release="r20261126-a1b2c3d", deploy_id="d0f00d",
                env="dev",
                credentials=Credentials.generate())
    base.update(kw)
    return SeedParams(**base)


@pytest.fixture(scope="module")
def cloud_init() -> str:
    path = shutil.which("cloud-init")
    if not path:
        pytest.fail("cloud-init is not installed: run `make setup-rollout` (apt cloud-init)")
    return path


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['role']}-{v['colour']}")
def test_rendered_seed_validates_with_cloud_init_schema(variant, tmp_path, cloud_init):
    path = tmp_path / "user-data"
    path.write_text(render_user_data(params(**variant)))
    res = subprocess.run([cloud_init, "schema", "-c", str(path)], capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_schema_check_can_fail(tmp_path, cloud_init):
    """The validator really rejects a broken seed (so the test above can fail)."""
    bad = render_user_data(params()).replace("permissions: '0600'", "permissions: [1, 2]")
    path = tmp_path / "user-data"
    path.write_text(bad)
    res = subprocess.run([cloud_init, "schema", "-c", str(path)], capture_output=True,
                         text=True, check=False)
    assert res.returncode != 0


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['role']}-{v['colour']}")
def test_seed_writes_the_contract_keys_0600(variant):
    p = params(**variant)
    text = render_user_data(p)
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    (entry,) = doc["write_files"]
    assert entry["path"] == "/etc/modelserve/instance.env"
    assert entry["permissions"] == "0600"
    env = parse_user_data(text)
    assert set(env) == CONTRACT_KEYS
    c = p.credentials
    assert env["MODELSERVE_ROLE"] == variant["role"]
    assert env["MODELSERVE_BROKER_URL"] == (
        f"amqp://{c.broker_user}:{c.broker_password}@{variant['broker_host']}:5672/modelserve")
    assert env["MODELSERVE_RESULT_URL"] == (
        f"redis://:{c.redis_password}@{variant['broker_host']}:6379/0")
    assert env["MODELSERVE_BROKER_BIND"] == variant["broker_bind"]


def test_credentials_are_fresh_and_never_repr():
    a, b = Credentials.generate(), Credentials.generate()
    assert a.broker_password != b.broker_password and a.redis_password != b.redis_password
    assert len(a.broker_password) >= 32
    assert a.broker_password not in repr(a) and a.redis_password not in repr(params(credentials=a))


@pytest.mark.parametrize("field,value", [
    ("release", "r1\nMODELSERVE_ROLE=front"),
    ("release", "r1 #x"),
    ("env", ""),
    ("deploy_id", "a'b"),
    ("role", "db"),
    ("colour", "red"),
])
def test_unsafe_or_invalid_values_are_refused(field, value):
    with pytest.raises(ValueError):
        render_user_data(params(**{field: value}))


def test_meta_data():
    doc = yaml.safe_load(render_meta_data("ms-dev-r1-front0-d0f00d", "ms-dev-r1-front0"))
    assert doc == {"instance-id": "ms-dev-r1-front0-d0f00d", "local-hostname": "ms-dev-r1-front0"}
    with pytest.raises(ValueError):
        render_meta_data("x\ny: z", "h")
