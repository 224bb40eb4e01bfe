"""A -> B -> rollback -> B -> rollback -> B on real LXD, with a load probe on the floating IP.

0 failed requests over 5 switches (the tool's own probe and an independent one running for
the whole sequence), /version right after every switch, and the seed really applied in the
booted instance.
"""

from __future__ import annotations

import subprocess

import pytest

from rollout.health import Probe, fetch_version
from rollout.seed import parse_env

pytestmark = pytest.mark.e2e


def instance_env(name: str) -> tuple[str, dict[str, str]]:
    mode = subprocess.run(["lxc", "exec", name, "--", "stat", "-c", "%a %U",
                           "/etc/modelserve/instance.env"], capture_output=True, text=True,
                          check=True).stdout.strip()
    text = subprocess.run(["lxc", "exec", name, "--", "cat", "/etc/modelserve/instance.env"],
                          capture_output=True, text=True, check=True).stdout
    return mode, parse_env(text)


def test_blue_green_switches_without_a_failed_request(cloud, releases, new_env, rollout):
    a, b = releases
    env = new_env("bg")
    first = rollout("deploy", "--env", env, "--release", a)
    assert first.rc == 0, first
    fip = first.json["floating_ip"]
    v = fetch_version(fip)
    assert (v["release"], v["colour"], v["role"]) == (a, "blue", "front")
    assert v["deploy_id"] == first.json["deploy_id"]

    # the seed did its job in the booted instance: the contract's file, mode 0600
    (front,) = [i for i in cloud.list_instances(env) if i.role == "front"]
    mode, values = instance_env(front.name)
    assert mode == "600 root"
    assert values["MODELSERVE_RELEASE"] == a and values["MODELSERVE_COLOUR"] == "blue"
    assert values["MODELSERVE_DEPLOY_ID"] == first.json["deploy_id"]
    assert values["MODELSERVE_BROKER_URL"].startswith(f"amqp://{values['MODELSERVE_BROKER_USER']}:")

    switches = [("deploy", b), ("rollback", a), ("deploy", b), ("rollback", a), ("deploy", b)]
    outside = Probe(fip, threads=2, max_requests=500_000, max_seconds=1500, pause=0.02).start()
    seen = []
    try:
        for action, release in switches:
            args = [action, "--env", env] + (["--release", release] if action == "deploy" else [])
            res = rollout(*args)
            assert res.rc == 0, (action, release, res)
            assert res.json["release"] == release
            after = fetch_version(fip)  # right after the command returned
            assert after["release"] == release, (action, after)
            probe = res.json["probe"]
            assert probe["total"] > 0 and probe["failed"] == 0, probe
            seen.append((action, release, res.json["seconds"], res.json["switch_to_traffic_s"]))
    finally:
        ext = outside.stop()
    assert ext.failed == 0, ext.to_dict()
    assert ext.total > 100 and set(ext.by_release) == {a, b}, ext.to_dict()

    colours = {i.release: i.colour for i in cloud.list_instances(env)}
    assert colours == {a: "blue", b: "green"}
    st = rollout("status", "--env", env)
    assert st.rc == 0 and st.json["live"] == b and st.json["previous"] == a
    hist = rollout("history", "--env", env)
    assert [(e["action"], e["release"]) for e in hist.json] == [("deploy", a)] + switches
