"""The default-project check (tests/lxd_guard.py) on canned LXD answers: what it flags, what
it leaves to the local-cloud set-up, and that a difference fails the session."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from tests import lxd_guard

BASE = {
    "/1.0/images?project=default&recursion=1": [
        {"fingerprint": "c2932e0fcdf2aa", "aliases": [{"name": "modelserve-base-debian12"}]},
        {"fingerprint": "a5d46df1969cbb", "aliases": [{"name": "modelserve-r1"}]},
    ],
    "/1.0/instances?project=default&recursion=1": [
        {"name": "web", "type": "container", "created_at": "2026-01-01"}],
    "/1.0/profiles?project=default&recursion=1": [
        {"name": "default", "config": {}, "devices": {"eth0": {"network": "msbr0"}},
         "description": ""}],
    "/1.0/networks?project=default&recursion=1": [
        {"name": "msbr0", "managed": True, "type": "bridge", "config": {"ipv4.nat": "true"}},
        {"name": "eth0", "managed": False, "type": "physical"}],
    "/1.0/networks/msbr0/forwards?recursion=1": [
        {"listen_address": "10.87.43.10", "config": {"user.modelserve.env": "dev"}},
        {"listen_address": "10.87.43.11", "config": {"user.modelserve.env": "t1",
                                                      "user.modelserve.project":
                                                          lxd_guard.TEST_PROJECT}}],
}


@pytest.fixture
def lxd(monkeypatch):
    state = copy.deepcopy(BASE)
    monkeypatch.setattr(lxd_guard, "_query", lambda path: copy.deepcopy(state[path]))
    return state


def test_no_change_no_difference(lxd):
    assert lxd_guard.diff(lxd_guard.snapshot(), lxd_guard.snapshot()) == []


def test_added_image_instance_profile_and_forward_are_named(lxd):
    before = lxd_guard.snapshot()
    lxd["/1.0/images?project=default&recursion=1"].append(
        {"fingerprint": "0123456789abff", "aliases": [{"name": "modelserve-standin-worse"}]})
    lxd["/1.0/instances?project=default&recursion=1"].append(
        {"name": "ms-x-front0", "type": "container", "created_at": "2026-01-02"})
    lxd["/1.0/profiles?project=default&recursion=1"][0]["devices"]["root"] = {"pool": "p"}
    lxd["/1.0/networks/msbr0/forwards?recursion=1"].pop(0)
    out = "\n".join(lxd_guard.diff(before, lxd_guard.snapshot()))
    assert "images 0123456789ab: added" in out and "modelserve-standin-worse" in out
    assert "instances ms-x-front0: added" in out
    assert "profiles default: changed" in out
    assert "forwards msbr0/10.87.43.10: removed" in out


def test_local_cloud_setup_and_the_suites_forwards_are_not_leftovers(lxd):
    before = lxd_guard.snapshot()
    imgs = lxd["/1.0/images?project=default&recursion=1"]
    imgs[0]["fingerprint"] = "ffffffffffff00"  # up.sh rebuilt the base image
    lxd["/1.0/networks?project=default&recursion=1"][0]["config"] = {"ipv4.nat": "false"}
    lxd["/1.0/networks/msbr0/forwards?recursion=1"].pop(1)  # the test project's forward
    assert lxd_guard.diff(before, lxd_guard.snapshot()) == []


def test_a_difference_fails_the_session(lxd, monkeypatch):
    monkeypatch.setitem(lxd_guard._state, "wanted", True)
    monkeypatch.setitem(lxd_guard._state, "before", lxd_guard.snapshot())
    monkeypatch.setattr(lxd_guard, "sweep_test_forwards", lambda: [])
    lxd["/1.0/instances?project=default&recursion=1"].append(
        {"name": "leftover", "type": "container", "created_at": "x"})
    lines = []
    rep = SimpleNamespace(write_sep=lambda *a, **k: None, write_line=lines.append)
    session = SimpleNamespace(exitstatus=0, config=SimpleNamespace(
        pluginmanager=SimpleNamespace(get_plugin=lambda name: rep)))
    lxd_guard.pytest_sessionfinish(session, 0)
    assert session.exitstatus == pytest.ExitCode.TESTS_FAILED
    assert any("instances leftover: added" in line for line in lines), lines


def test_unarmed_without_an_lxd_tier(lxd, monkeypatch):
    monkeypatch.setitem(lxd_guard._state, "wanted", False)
    monkeypatch.setitem(lxd_guard._state, "before", None)
    items = [SimpleNamespace(nodeid="tests/unit/test_codec.py::test_x",
                             get_closest_marker=lambda m: None)]
    lxd_guard.pytest_collection_modifyitems(None, None, items)
    assert lxd_guard._state["before"] is None


def test_the_openstack_harness_bridge_coming_and_going_is_not_a_leftover(lxd):
    """The OpenStack tier may run beside this session: its harness makes its bridge, floating
    IPs on it (forwards) and removes them all, at any time; none of it is the user's."""
    before = lxd_guard.snapshot()
    lxd["/1.0/networks?project=default&recursion=1"].append(
        {"name": lxd_guard._harness_bridge(), "managed": True, "type": "bridge",
         "config": {"ipv4.address": "10.88.42.1/24"}})
    lxd[f"/1.0/networks/{lxd_guard._harness_bridge()}/forwards?recursion=1"] = [
        {"listen_address": "10.88.43.5", "config": {}}]
    assert lxd_guard.diff(before, lxd_guard.snapshot()) == []
    # any other new bridge still is
    lxd["/1.0/networks?project=default&recursion=1"].append(
        {"name": "userbr1", "managed": True, "type": "bridge", "config": {}})
    lxd["/1.0/networks/userbr1/forwards?recursion=1"] = []
    assert "networks userbr1: added" in "\n".join(lxd_guard.diff(before, lxd_guard.snapshot()))


def test_the_harness_bridge_name_is_the_harness_configs():
    from localcloud.openstack import config

    assert lxd_guard._harness_bridge() == config.LXD_BRIDGE
