"""The NoCloud seed: rendered values, escaping, and `cloud-init schema` on every variant."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from rollout import tls
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
    "MODELSERVE_WORKER_CONCURRENCY", "MODELSERVE_WEB_PROCESSES",
}
TLS = tls.generate("10.77.0.12")
VARIANTS = [
    dict(role="front", colour="blue", broker_host="127.0.0.1", broker_bind="127.0.0.1"),
    dict(role="front", colour="green", broker_host="127.0.0.1", broker_bind="0.0.0.0",
         broker_peers=("10.77.0.13", "10.77.0.14"), tls=TLS),
    dict(role="worker", colour="green", broker_host="10.77.0.12", broker_bind="127.0.0.1",
         tls=TLS),
    dict(role="worker", colour="green", broker_host="10.77.0.12", broker_bind="127.0.0.1"),
]


def _id(v: dict) -> str:
    return f"{v['role']}-{v['colour']}" + ("-tls" if v.get("tls") else "")


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


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
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


@pytest.mark.parametrize("variant", VARIANTS, ids=_id)
def test_seed_writes_the_contract_keys_0600(variant):
    p = params(**variant)
    text = render_user_data(p)
    assert text.startswith("#cloud-config\n")
    doc = yaml.safe_load(text)
    entry = doc["write_files"][-1]  # instance.env last: first boot starts when it exists
    assert entry["path"] == "/etc/modelserve/instance.env"
    for e in doc["write_files"]:
        assert (e["owner"], e["permissions"]) == ("root:root", "0600"), e["path"]
    env = parse_user_data(text)
    c = p.credentials
    host = variant["broker_host"]
    assert env["MODELSERVE_ROLE"] == variant["role"]
    assert env["MODELSERVE_BROKER_BIND"] == variant["broker_bind"]
    paths = [e["path"] for e in doc["write_files"][:-1]]
    if variant.get("tls") is None:  # no TLS: exactly the contract keys, plain URLs
        assert set(env) == CONTRACT_KEYS and paths == []
        assert env["MODELSERVE_BROKER_URL"] == (
            f"amqp://{c.broker_user}:{c.broker_password}@{host}:5672/modelserve")
        assert env["MODELSERVE_RESULT_URL"] == f"redis://:{c.redis_password}@{host}:6379/0"
    elif variant["role"] == "front":  # exposed: plain AMQP on loopback, Redis TLS only
        assert set(env) == CONTRACT_KEYS | {"MODELSERVE_BROKER_PEERS", "MODELSERVE_TLS_CA",
                                            "MODELSERVE_TLS_CHECK_HOSTNAME"}
        assert env["MODELSERVE_BROKER_PEERS"] == "10.77.0.13,10.77.0.14"
        assert env["MODELSERVE_BROKER_URL"] == (
            f"amqp://{c.broker_user}:{c.broker_password}@127.0.0.1:5672/modelserve")
        assert env["MODELSERVE_RESULT_URL"] == f"rediss://:{c.redis_password}@127.0.0.1:6380/0"
        assert paths == ["/etc/modelserve/tls/ca.pem", "/etc/modelserve/tls/server.pem",
                         "/etc/modelserve/tls/server.key"]
    else:  # a worker: TLS to its front, verified against the CA, the key never sent
        assert env["MODELSERVE_BROKER_URL"] == (
            f"amqps://{c.broker_user}:{c.broker_password}@{host}:5671/modelserve")
        assert env["MODELSERVE_RESULT_URL"] == f"rediss://:{c.redis_password}@{host}:6380/0"
        assert env["MODELSERVE_TLS_CA"] == "/run/modelserve/ca.pem"
        assert env["MODELSERVE_TLS_CHECK_HOSTNAME"] == "1"  # the cert names this host
        assert paths == ["/etc/modelserve/tls/ca.pem"]
        assert TLS.key_pem not in text and "PRIVATE KEY" not in text


def test_tls_files_carry_the_deploys_material():
    doc = yaml.safe_load(render_user_data(params(**VARIANTS[1])))
    files = {e["path"]: e["content"] for e in doc["write_files"]}
    assert files["/etc/modelserve/tls/ca.pem"] == TLS.ca_pem
    assert files["/etc/modelserve/tls/server.pem"] == TLS.cert_pem
    assert files["/etc/modelserve/tls/server.key"] == TLS.key_pem


def test_an_exposed_front_needs_tls_and_valid_peers():
    with pytest.raises(ValueError, match="TLS"):
        render_user_data(params(broker_bind="0.0.0.0"))
    with pytest.raises(ValueError, match="IPv4"):
        render_user_data(params(broker_bind="0.0.0.0", tls=TLS, broker_peers=("10.0.0.1\nX=1",)))
    # peers unknown beforehand (a cloud that picks addresses itself): the cloud filters
    env = parse_user_data(render_user_data(params(broker_bind="0.0.0.0", tls=TLS)))
    assert env["MODELSERVE_BROKER_PEERS"] == "any"


def test_a_worker_checks_the_address_only_when_the_certificate_names_it():
    unnamed = tls.generate(None)
    env = parse_user_data(render_user_data(params(role="worker", broker_host="10.77.0.12",
                                                  tls=unnamed)))
    assert env["MODELSERVE_TLS_CHECK_HOSTNAME"] == "0"  # the chain (this deploy's CA) only


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
