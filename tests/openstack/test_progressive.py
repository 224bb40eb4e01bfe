"""Progressive delivery through the OpenStack tier (issue 11): post-switch analysis with
automatic rollback, notifications, the model-diff gate, preview / promote / abort.

Misbehaving releases are in their *image*, as on LXD: a stand-in image booted by Nova on the
LXD host (tests/openstack/standins.py) carries its behaviour as a file (``fail N``: every route
but /metrics answers 500 N s after the front's first prediction, which is the health gate's;
``slow N``: 1.5 s late; ``flip``: every prediction's label flips). The rollout tool is driven
only through its CLI; events go to a real HTTP receiver (the ``receiver`` fixture of
tests/conftest.py). Each case works in its own env (``env_name``), so one failing case leaves
nothing for the next.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from rollout.clouds.base import preview_env
from rollout.clouds.openstack import env_tag
from tests.openstack.osenv import fip_of, live_release, live_servers, ok, rollout, version_via

pytestmark = pytest.mark.openstack

# The pass path of the analysis, with its error-rate judgement: a short window, and a latency
# slack no loaded test machine reaches (a few slow probes of a short window are noise there)
PASSING = ("--analysis-window", "3", "--p99-slack-ms", "5000")


def _json(proc):
    return json.loads(proc.stdout)


def _kinds(events):
    return [e["type"].rsplit(".", 1)[-1] for e in events]


def _releases_of(conn, env_name):
    return {s.metadata.get("modelserve_release") for s in live_servers(conn, env_name)}


def _servers_settle(conn, env_name, releases, timeout=120):
    """The env's servers come to be exactly those of ``releases`` (Nova deletes
    asynchronously: a server the tool deleted is listed until nova-compute is done)."""
    deadline = time.monotonic() + timeout
    while (got := _releases_of(conn, env_name)) != set(releases):
        assert time.monotonic() < deadline, f"servers of {sorted(got)} in {env_name}"
        time.sleep(0.5)


def _history(os_env, env_name):
    return _json(ok(rollout(os_env, "history", "--json", env_name=env_name)))


def _check_events(events, env_name, *, release, from_release):
    for e in events:
        assert e["specversion"] == "1.0" and e["source"] == f"modelserve-rollout/{env_name}", e
        assert e["content_type"].startswith("application/cloudevents+json"), e
        data = e["data"]
        assert (data["env"], data["release"], data["from_release"]) == (
            env_name, release, from_release), (e["type"], data)
        assert data["deploy_id"], e


@pytest.mark.parametrize("behaviour, why", [("fail 15", "error rate"), ("slow 15", "p99")],
                         ids=["fails", "turns-slow"])
def test_a_release_that_degrades_after_the_switch_is_rolled_back(
        os_env, conn, releases, standin_release, env_name, receiver, behaviour, why):
    a = releases[0]
    # degrades 15 s after the gate's prediction: after the diff gate, the 5 s baseline, the
    # switch and its /version check (~8 s here), well inside the 20 s window
    bad = standin_release(behaviour)
    url, events = receiver
    ok(rollout(os_env, "deploy", "--release", a, env_name=env_name))
    first_id = fip_of(conn, env_name).id

    res = rollout(os_env, "deploy", "--release", bad, "--analysis-window", "20", "--json",
                  "--notify", url, env_name=env_name)
    assert res.returncode == 8, f"rc={res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}"
    out = _json(res)
    assert out["rolled_back"] is True, out
    verdict = out["analysis"]
    assert verdict["outcome"] == "failed" and why in verdict["reason"], verdict
    assert verdict["baseline"]["requests"] > 0 and verdict["baseline"]["failed"] == 0, verdict
    if behaviour.startswith("fail"):
        assert verdict["now"]["failed"] > 0, verdict
        assert verdict["server"]["errors"] > 0, verdict  # the front's /metrics counted 500s
    else:
        assert verdict["now"]["p99_ms"] > verdict["baseline"]["p99_ms"] + 1000, verdict

    # the floating IP (the same one) serves A again; the bad release's server is gone
    assert fip_of(conn, env_name).id == first_id
    assert live_release(conn, env_name) == a
    _servers_settle(conn, env_name, {a})

    last = _history(os_env, env_name)[-1]
    assert (last["action"], last["release"], last["from_release"]) == (
        "analysis_failed", bad, a), last
    for figure in ("err=", "p50=", "p99=", "n=", f"rolled back to {a}"):
        assert figure in last["detail"], last["detail"]
    status = _json(ok(rollout(os_env, "status", "--json", env_name=env_name)))
    assert status["live"] == a and not status.get("lock"), status

    assert _kinds(events) == ["started", "gated", "switched", "analysis_failed",
                              "rolled_back"], _kinds(events)
    _check_events(events, env_name, release=bad, from_release=a)
    failed = events[3]["data"]
    assert failed["figures"]["analysis"]["outcome"] == "failed" and failed["reason"], failed


def test_a_receiver_gets_every_event_of_a_deploy_and_a_rollback(
        os_env, conn, releases, env_name, receiver):
    a, b = releases[:2]
    url, events = receiver
    ok(rollout(os_env, "deploy", "--release", a, "--notify", url, *PASSING, env_name=env_name))
    assert _kinds(events) == ["started", "gated", "switched", "analysis_passed"], _kinds(events)
    _check_events(events, env_name, release=a, from_release=None)
    assert len({e["data"]["deploy_id"] for e in events}) == 1
    assert events[-1]["data"]["figures"]["analysis"]["outcome"] == "passed"

    events.clear()
    ok(rollout(os_env, "deploy", "--release", b, "--notify", url, *PASSING, env_name=env_name))
    assert _kinds(events) == ["started", "gated", "switched", "analysis_passed"], _kinds(events)
    _check_events(events, env_name, release=b, from_release=a)

    events.clear()
    ok(rollout(os_env, "rollback", "--notify", url, env_name=env_name))
    assert live_release(conn, env_name) == a
    assert _kinds(events) == ["started", "gated", "rolled_back"], _kinds(events)
    _check_events(events, env_name, release=a, from_release=b)


def _preview(os_env, conn, env_name, release, url=None):
    """``deploy --preview``: returns the --json's ``preview``; the preview IP serves it."""
    notify = ["--notify", url] if url else []
    res = _json(ok(rollout(os_env, "deploy", "--release", release, "--preview", "--json",
                           *notify, env_name=env_name)))
    assert res["action"] == "preview" and res["preview"]["release"] == release, res
    pv_ips = list(conn.network.ips(tags=env_tag(preview_env(env_name))))
    assert [ip.floating_ip_address for ip in pv_ips] == [res["preview"]["address"]]
    assert version_via(res["preview"]["address"])["release"] == release
    return res["preview"]


def test_preview_refuses_a_deploy_meanwhile_and_abort_deletes_it(
        os_env, conn, releases, env_name, receiver):
    a, b, c = releases[:3]
    url, events = receiver
    ok(rollout(os_env, "deploy", "--release", a, env_name=env_name))
    main_ip = fip_of(conn, env_name).floating_ip_address

    # preview B: a second floating IP serves B, the main one still A
    pv = _preview(os_env, conn, env_name, b, url)
    preview_ip = pv["address"]
    assert preview_ip != main_ip
    assert version_via(main_ip)["release"] == a
    assert _kinds(events) == ["started", "gated", "previewed"], _kinds(events)
    _check_events(events, env_name, release=b, from_release=a)
    status = _json(ok(rollout(os_env, "status", "--json", env_name=env_name)))
    assert status["preview"]["release"] == b and status["live"] == a, status

    # a deploy meanwhile is refused, naming the pending preview; nothing changes
    refused = rollout(os_env, "deploy", "--release", c, env_name=env_name)
    assert refused.returncode == 3, refused.stderr
    assert f"pending preview of release {b}" in refused.stderr, refused.stderr
    assert _releases_of(conn, env_name) == {a, b}
    assert version_via(main_ip)["release"] == a

    # abort: the preview's servers go, the preview IP serves nothing, A is untouched
    events.clear()
    ok(rollout(os_env, "abort", "--notify", url, env_name=env_name))
    assert _kinds(events) == ["started", "aborted"], _kinds(events)
    _servers_settle(conn, env_name, {a})
    (ip,) = conn.network.ips(tags=env_tag(preview_env(env_name)))
    assert ip.port_id is None
    with pytest.raises(requests.RequestException):
        version_via(preview_ip)
    assert version_via(main_ip)["release"] == a
    last = _history(os_env, env_name)[-1]
    assert (last["action"], last["release"]) == ("abort", b), last
    status = _json(ok(rollout(os_env, "status", "--json", env_name=env_name)))
    assert status["live"] == a and not status.get("preview"), status

    # the next preview gets the same address
    assert _preview(os_env, conn, env_name, c)["address"] == preview_ip
    assert version_via(main_ip)["release"] == a


def test_preview_then_promote(os_env, conn, releases, env_name, receiver):
    a, b = releases[:2]
    url, events = receiver
    ok(rollout(os_env, "deploy", "--release", a, env_name=env_name))
    main_ip = fip_of(conn, env_name).floating_ip_address
    preview_ip = _preview(os_env, conn, env_name, b)["address"]
    assert version_via(main_ip)["release"] == a

    # promote: the main floating IP serves B (the previewed set), history says so
    ok(rollout(os_env, "promote", "--notify", url, *PASSING, env_name=env_name))
    assert version_via(main_ip)["release"] == b
    last = _history(os_env, env_name)[-1]
    assert (last["action"], last["release"], last["from_release"]) == ("promote", b, a), last
    assert _kinds(events) == ["started", "gated", "switched", "analysis_passed",
                              "promoted"], _kinds(events)
    _check_events(events, env_name, release=b, from_release=a)
    status = _json(ok(rollout(os_env, "status", "--json", env_name=env_name)))
    assert status["live"] == b and status["previous"] == a and not status.get("preview"), status
    assert _releases_of(conn, env_name) == {a, b}  # A stays warm for a rollback
    with pytest.raises(requests.RequestException):
        version_via(preview_ip)  # the preview address is free again


def test_the_diff_gate_refuses_a_release_whose_model_flips_the_labels(
        os_env, conn, releases, standin_release, env_name):
    a = releases[0]
    flip = standin_release("flip")
    ok(rollout(os_env, "deploy", "--release", a, env_name=env_name))

    res = rollout(os_env, "deploy", "--release", flip, "--json", env_name=env_name)
    assert res.returncode == 3, f"rc={res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}"
    assert "model-diff gate" in res.stderr, res.stderr
    out = _json(res)
    assert out["type"] == "DiffRefused" and out["diff"]["outcome"] == "refused", out
    assert out["diff"]["rows"] > 0 and out["diff"]["flipped"] == out["diff"]["rows"], out["diff"]
    assert live_release(conn, env_name) == a
    _servers_settle(conn, env_name, {a})  # no server of the flip release is left
    status = _json(ok(rollout(os_env, "status", "--json", env_name=env_name)))
    assert status["live"] == a and not status.get("lock"), status
