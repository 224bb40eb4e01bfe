"""Preview, promote and abort on real LXD (issue 11): ``deploy --preview`` serves green on the
env's second network forward (stable across deploys) while the floating IP keeps serving
blue; a deploy meanwhile is refused naming the preview; ``abort`` deletes green; ``promote``
switches with the probe and the analysis; a real receiver gets every event."""

from __future__ import annotations

import pytest

from rollout.clouds.base import preview_env
from rollout.health import NotReady, fetch_version
from tests.e2e.lxdenv import run_rollout
from tests.e2e.standin import build_standin

pytestmark = pytest.mark.e2e
BLUE, GREEN = "standin-a", "standin-b"


def kinds(events: list[dict], since: int = 0) -> list[str]:
    return [e["type"].rsplit(".", 1)[-1] for e in events[since:]]


def serves_nothing(address: str) -> bool:
    try:
        fetch_version(address)
    except (NotReady, OSError):
        return True
    return False


def test_preview_abort_preview_promote(cloud, new_env, receiver):
    build_standin(BLUE, accuracy=0.78)
    build_standin(GREEN, accuracy=0.80)
    url, events = receiver
    env = new_env("pv")
    first = run_rollout("deploy", "--env", env, "--release", BLUE)
    assert first.rc == 0, first
    fip = first.json["floating_ip"]

    pv = run_rollout("deploy", "--env", env, "--release", GREEN, "--preview", "--notify", url)
    assert pv.rc == 0, pv
    address = pv.json["preview"]["address"]
    assert address != fip and fetch_version(address)["release"] == GREEN
    assert fetch_version(fip)["release"] == BLUE  # not switched
    assert kinds(events) == ["started", "gated", "previewed"], kinds(events)
    state = cloud.find_floating_ip(env).state
    assert state.lock is None and state.preview.release == GREEN  # no lock held meanwhile

    refused = run_rollout("deploy", "--env", env, "--release", GREEN)
    assert refused.rc == 3 and f"pending preview of release {GREEN}" in refused.err, refused
    st = run_rollout("status", "--env", env)
    assert st.json["preview"]["release"] == GREEN and st.json["preview"]["address"] == address

    ab = run_rollout("abort", "--env", env, "--notify", url)
    assert ab.rc == 0, ab
    assert {i.release for i in cloud.list_instances(env)} == {BLUE}  # green deleted
    assert serves_nothing(address) and fetch_version(fip)["release"] == BLUE
    assert kinds(events, 3) == ["started", "aborted"], kinds(events)

    pv2 = run_rollout("deploy", "--env", env, "--release", GREEN, "--preview")
    assert pv2.rc == 0, pv2
    assert pv2.json["preview"]["address"] == address  # stable across deploys
    n = len(events)
    # the analysis' pass path with its error-rate judgement; a latency slack no loaded test
    # machine reaches (a few slow probes of a short window are noise there)
    pr = run_rollout("promote", "--env", env, "--notify", url, "--analysis-window", "3",
                     "--p99-slack-ms", "5000")
    assert pr.rc == 0, pr
    assert pr.json["analysis"]["outcome"] == "passed" and pr.json["probe"]["failed"] == 0
    assert fetch_version(fip)["release"] == GREEN and serves_nothing(address)
    assert kinds(events, n) == ["started", "gated", "switched", "analysis_passed",
                                "promoted"], kinds(events)
    assert all(e["data"]["env"] == env and e["data"]["release"] == GREEN for e in events)
    state = cloud.find_floating_ip(env).state
    assert state.preview is None and (state.live, state.previous) == (GREEN, BLUE)
    hist = run_rollout("history", "--env", env)
    assert [e["action"] for e in hist.json] == ["deploy", "preview", "abort", "preview",
                                                 "promote"], hist.json
    assert cloud.find_floating_ip(preview_env(env)).target is None
