"""OpenStack per-role security groups (rollout/clouds/openstack.py), on an in-memory Neutron:
web 8080 from anywhere; broker 5671/6380 from the worker group only; workers no ingress.
Created when missing, completed when a rule is missing, refused when a foreign rule is there;
the live OpenStack tier (tests/openstack) runs the same code against real Neutron."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
from openstack import exceptions as os_exc

from rollout.clouds.openstack import (
    BROKER_GROUP,
    WEB_GROUP,
    WORKER_GROUP,
    OpenStackCloud,
)
from rollout.errors import CloudError

_ids = itertools.count(1)


class FakeNetwork:
    """The slice of ``conn.network`` the security groups use."""

    def __init__(self):
        self.groups: dict[str, SimpleNamespace] = {}
        self.rules: list[SimpleNamespace] = []
        self.created_rules: list[dict] = []

    def security_groups(self, name=None):
        return [g for g in self.groups.values() if name is None or g.name == name]

    def create_security_group(self, name, description=""):
        gid = f"sg-{next(_ids)}"
        self.groups[gid] = SimpleNamespace(id=gid, name=name, created_at=f"2026-{gid}")
        # Neutron gives every new group its egress rules
        self.rules.append(SimpleNamespace(security_group_id=gid, direction="egress",
                                          ether_type="IPv4", protocol=None,
                                          port_range_min=None, port_range_max=None,
                                          remote_ip_prefix=None, remote_group_id=None))
        return self.groups[gid]

    def delete_security_group(self, gid, ignore_missing=True):
        self.groups.pop(gid, None)

    def security_group_rules(self, security_group_id):
        return [r for r in self.rules if r.security_group_id == security_group_id]

    def create_security_group_rule(self, **kw):
        assert all(v is not None for v in kw.values()), kw  # nulls are omitted
        self.created_rules.append(kw)
        rule = SimpleNamespace(security_group_id=kw["security_group_id"],
                               direction=kw["direction"], ether_type=kw["ethertype"],
                               protocol=kw["protocol"], port_range_min=kw["port_range_min"],
                               port_range_max=kw["port_range_max"],
                               remote_ip_prefix=kw.get("remote_ip_prefix"),
                               remote_group_id=kw.get("remote_group_id"))
        key = lambda r: (r.security_group_id, r.direction, r.ether_type, r.protocol,  # noqa: E731
                         r.port_range_min, r.port_range_max, r.remote_ip_prefix,
                         r.remote_group_id)
        if any(key(r) == key(rule) for r in self.rules):
            raise os_exc.ConflictException("Security group rule already exists")
        self.rules.append(rule)
        return rule

    def ingress(self, name: str) -> set[tuple]:
        (g,) = self.security_groups(name)
        return {(r.protocol, r.port_range_min, r.remote_ip_prefix, r.remote_group_id)
                for r in self.security_group_rules(g.id) if r.direction == "ingress"}

    def gid(self, name: str) -> str:
        return min(self.security_groups(name), key=lambda g: g.created_at).id


def cloud_on(net: FakeNetwork, **kw) -> OpenStackCloud:
    return OpenStackCloud(conn=SimpleNamespace(network=net), sleep=lambda s: None, **kw)


def test_groups_are_created_per_role_with_exactly_the_rules():
    net = FakeNetwork()
    cloud = cloud_on(net)
    front, worker = cloud._security_groups("front"), cloud._security_groups("worker")
    assert front == [{"name": net.gid(WEB_GROUP)}, {"name": net.gid(BROKER_GROUP)}]
    assert worker == [{"name": net.gid(WORKER_GROUP)}]
    assert net.ingress(WEB_GROUP) == {("tcp", 8080, "0.0.0.0/0", None)}
    worker_id = net.gid(WORKER_GROUP)
    assert net.ingress(BROKER_GROUP) == {("tcp", 5671, None, worker_id),
                                         ("tcp", 6380, None, worker_id)}
    assert net.ingress(WORKER_GROUP) == set()


def test_a_second_run_reuses_them_and_adds_only_what_is_missing():
    net = FakeNetwork()
    cloud_on(net)._security_groups("front")
    before = len(net.created_rules)
    cloud_on(net)._security_groups("front")  # checked again, nothing to add
    assert len(net.created_rules) == before and len(net.groups) == 3
    (web,) = net.security_groups(WEB_GROUP)
    net.rules = [r for r in net.rules if r.security_group_id != web.id]  # someone removed it
    cloud_on(net)._security_groups("worker")
    assert net.ingress(WEB_GROUP) == {("tcp", 8080, "0.0.0.0/0", None)}


def test_a_foreign_ingress_rule_is_refused():
    net = FakeNetwork()
    cloud_on(net)._security_groups("front")
    net.create_security_group_rule(security_group_id=net.gid(BROKER_GROUP),
                                   direction="ingress", ethertype="IPv4", protocol="tcp",
                                   port_range_min=5671, port_range_max=5671,
                                   remote_ip_prefix="0.0.0.0/0")
    with pytest.raises(CloudError, match="modelserve-broker.*did not make"):
        cloud_on(net)._security_groups("front")


def test_the_oldest_group_of_a_name_wins():
    net = FakeNetwork()
    first = net.create_security_group(WORKER_GROUP)
    net.create_security_group(WORKER_GROUP)  # a racing run's duplicate
    cloud_on(net)._security_groups("worker")
    assert cloud_on(net)._security_groups("worker") == [{"name": first.id}]
    (rule_5671,) = [r for r in net.security_group_rules(net.gid(BROKER_GROUP))
                    if r.port_range_min == 5671]
    assert rule_5671.remote_group_id == first.id


def test_a_configured_group_is_used_for_every_role_untouched():
    net = FakeNetwork()
    cloud = cloud_on(net, security_group="ops-group")
    assert cloud._security_groups("front") == cloud._security_groups("worker") == [
        {"name": "ops-group"}]
    assert net.groups == {}


def test_servers_get_their_roles_groups():
    net = FakeNetwork()
    made = []
    compute = SimpleNamespace(
        find_flavor=lambda name, ignore_missing: SimpleNamespace(id="f1"),
        create_server=lambda **kw: made.append(kw) or SimpleNamespace(
            id=f"srv-{len(made)}", name=kw["name"], metadata={}, status="BUILD",
            addresses={}, tags=[]))
    cloud = OpenStackCloud(conn=SimpleNamespace(network=net, compute=compute),
                           network="net-1", sleep=lambda s: None)
    cloud._ids["net"] = "net-1"
    from rollout.clouds.base import InstanceSpec, Release

    rel = Release("img", "modelserve-a", "a", "sha", 0.8)
    for role in ("front", "worker"):
        labels = {"env": "dev", "release": "a", "colour": "blue", "role": role,
                  "deploy_id": "d1", "created_at": "2026-01-01T00:00:00Z",
                  "model_sha256": "sha"}
        cloud.create_instance(InstanceSpec(f"ms-{role}", rel, labels, "#cloud-config\n{}\n"))
    assert made[0]["security_groups"] == [{"name": net.gid(WEB_GROUP)},
                                          {"name": net.gid(BROKER_GROUP)}]
    assert made[1]["security_groups"] == [{"name": net.gid(WORKER_GROUP)}]
