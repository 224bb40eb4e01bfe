"""--workers N on the in-memory cloud: the executor fixes the addresses before the front's seed
is rendered, so the front's broker firewall names exactly its workers and its certificate
names its address; one CA per deploy, its key on the front only."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
import yaml
from cryptography import x509

from rollout import executor
from rollout.clouds.base import Release
from rollout.planner import DeployRequest
from rollout.seed import parse_user_data
from tests.unit.rollout.fakecloud import FakeCloud, _next_address, free_port

ENV = "dev"
RELEASES = [Release("img-a", "modelserve-a", "a", "sha-a", 0.78, built_at="2026-01-01"),
            Release("img-b", "modelserve-b", "b", "sha-b", 0.78, built_at="2026-01-02")]


class RecordingCloud(FakeCloud):
    """Records every InstanceSpec; ``picks`` says whether it fixes addresses beforehand."""

    def __init__(self, *a, picks: bool, **kw):
        super().__init__(*a, **kw)
        self.picks, self.specs, self.picked = picks, [], []

    def pick_addresses(self, count):
        if not self.picks:
            return None
        self.picked = [_next_address() for _ in range(count)]
        return list(self.picked)

    def create_instance(self, spec):
        self.specs.append(spec)
        return super().create_instance(spec)


@pytest.fixture
def make_cloud():
    made = []

    def make(picks: bool) -> RecordingCloud:
        made.append(RecordingCloud(RELEASES, port=free_port(), picks=picks))
        return made[-1]

    yield make
    for c in made:
        c.close()


def deploy(cloud, release, workers):
    ctx = executor.Context(cloud=cloud, env=ENV, sleep=lambda s: None, port=cloud.port)
    return executor.deploy(ctx, DeployRequest(ENV, ctx.deploy_id, release=release,
                                              workers=workers))


def _files(user_data: str) -> dict[str, str]:
    return {e["path"]: e["content"] for e in yaml.safe_load(user_data)["write_files"]}


def test_front_seed_names_the_workers_fixed_addresses_and_its_own(make_cloud):
    cloud = make_cloud(picks=True)
    deploy(cloud, "a", workers=2)
    front, *workers = cloud.specs
    assert [s.labels["role"] for s in cloud.specs] == ["front", "worker", "worker"]
    assert [s.address for s in cloud.specs] == cloud.picked  # pinned as picked
    fenv = parse_user_data(front.user_data)
    assert fenv["MODELSERVE_BROKER_BIND"] == "0.0.0.0"
    assert fenv["MODELSERVE_BROKER_PEERS"] == ",".join(cloud.picked[1:])
    ffiles = _files(front.user_data)
    cert = x509.load_pem_x509_certificate(ffiles["/etc/modelserve/tls/server.pem"].encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address(front.address) in san.get_values_for_type(x509.IPAddress)
    for w in workers:
        wenv, wfiles = parse_user_data(w.user_data), _files(w.user_data)
        assert wenv["MODELSERVE_BROKER_URL"].startswith("amqps://")
        assert f"@{front.address}:5671/" in wenv["MODELSERVE_BROKER_URL"]
        assert wenv["MODELSERVE_RESULT_URL"].endswith(f"@{front.address}:6380/0")
        assert wenv["MODELSERVE_TLS_CHECK_HOSTNAME"] == "1"
        assert set(wfiles) == {"/etc/modelserve/tls/ca.pem", "/etc/modelserve/instance.env"}
        assert wfiles["/etc/modelserve/tls/ca.pem"] == ffiles["/etc/modelserve/tls/ca.pem"]


def test_each_deploy_has_its_own_ca(make_cloud):
    cloud = make_cloud(picks=True)
    deploy(cloud, "a", workers=1)
    deploy(cloud, "b", workers=1)
    cas = {_files(s.user_data)["/etc/modelserve/tls/ca.pem"] for s in cloud.specs}
    assert len(cas) == 2


def test_without_workers_nothing_is_exposed(make_cloud):
    cloud = make_cloud(picks=True)
    deploy(cloud, "a", workers=0)
    (front,) = cloud.specs
    env = parse_user_data(front.user_data)
    assert front.address is None and cloud.picked == []
    assert env["MODELSERVE_BROKER_BIND"] == "127.0.0.1"
    assert env["MODELSERVE_RESULT_URL"].startswith("redis://")
    assert "MODELSERVE_BROKER_PEERS" not in env
    assert set(_files(front.user_data)) == {"/etc/modelserve/instance.env"}


def test_a_cloud_that_assigns_addresses_itself_gets_tls_without_an_address_filter(make_cloud):
    cloud = make_cloud(picks=False)
    deploy(cloud, "a", workers=1)
    front, worker = cloud.specs
    assert front.address is None and worker.address is None
    assert parse_user_data(front.user_data)["MODELSERVE_BROKER_PEERS"] == "any"
    wenv = parse_user_data(worker.user_data)
    assert wenv["MODELSERVE_BROKER_URL"].startswith("amqps://")
    assert wenv["MODELSERVE_TLS_CHECK_HOSTNAME"] == "0"  # the CA chain only


class OrderCloud(RecordingCloud):
    """Records creates and boot waits (an instance's first read) in order; ``fail_wait``: the
    instance of that role reads as ERROR (its boot failed)."""

    def __init__(self, *a, fail_wait: str = "", **kw):
        super().__init__(*a, **kw)
        self.order, self.fail_wait, self._read = [], fail_wait, set()

    def create_instance(self, spec):
        self.order.append(("create", spec.labels["role"]))
        return super().create_instance(spec)

    def get_instance(self, instance_id):
        inst = super().get_instance(instance_id)
        if instance_id not in self._read:
            self._read.add(instance_id)
            self.order.append(("wait", inst.role))
        return replace(inst, status="ERROR") if inst.role == self.fail_wait else inst


def test_workers_with_fixed_addresses_are_created_beside_their_front():
    """Created before the front's boot wait: they boot in parallel with it, and the cloud
    holds their addresses from then on (not only this process, for a whole front boot)."""
    cloud = OrderCloud(RELEASES, port=free_port(), picks=True)
    try:
        deploy(cloud, "a", workers=2)
        assert cloud.order == [("create", "front"), ("create", "worker"), ("create", "worker"),
                               ("wait", "front"), ("wait", "worker"), ("wait", "worker")]
    finally:
        cloud.close()


def test_a_cloud_that_assigns_addresses_launches_workers_after_their_front():
    cloud = OrderCloud(RELEASES, port=free_port(), picks=False)
    try:
        deploy(cloud, "a", workers=1)  # the worker's seed needs the front's address
        assert cloud.order == [("create", "front"), ("wait", "front"), ("create", "worker"),
                               ("wait", "worker")]
    finally:
        cloud.close()


def test_a_front_that_fails_to_boot_takes_its_early_workers_with_it():
    from rollout.errors import RolloutError

    cloud = OrderCloud(RELEASES, port=free_port(), picks=True, fail_wait="front")
    try:
        with pytest.raises(RolloutError):
            deploy(cloud, "a", workers=2)
        assert [c for c in cloud.order if c[0] == "create"] == [
            ("create", "front"), ("create", "worker"), ("create", "worker")]
        assert cloud.instances == {}  # the undo deleted the front and both workers
    finally:
        cloud.close()
