"""Post-switch analysis on real LXD: a release that starts failing once it is live is switched
back automatically (exit 8), and history and a real notification receiver say why.

The degradation comes from the stand-in image itself (``standin-degrades``: its server
answers 500 on every route 12 s after its first prediction, which is the health gate's), not
from any hook of the tool. One deploy pair: ``standin-a`` live, then the degrading release.
"""

from __future__ import annotations

import pytest

from rollout.health import fetch_version
from tests.e2e.lxdenv import run_rollout
from tests.e2e.standin import build_standin

pytestmark = pytest.mark.e2e
BLUE, BAD = "standin-a", "standin-degrades"


def test_a_release_that_degrades_after_the_switch_is_rolled_back(cloud, new_env, receiver):
    build_standin(BLUE, accuracy=0.78)
    build_standin(BAD, accuracy=0.80, degrade="fail 12")
    url, events = receiver
    env = new_env("an")
    first = run_rollout("deploy", "--env", env, "--release", BLUE)
    assert first.rc == 0, first
    fip = first.json["floating_ip"]

    res = run_rollout("deploy", "--env", env, "--release", BAD, "--analysis-window", "30",
                      "--notify", url)
    assert res.rc == 8, res
    assert res.json["type"] == "AnalysisFailed" and res.json["rolled_back"] is True
    verdict = res.json["analysis"]
    assert verdict["outcome"] == "failed" and "error rate" in verdict["reason"]
    assert verdict["now"]["failed"] > 0 and verdict["baseline"]["requests"] > 0
    assert verdict["baseline"]["failed"] == 0

    assert fetch_version(fip)["release"] == BLUE  # the floating IP serves blue again
    hist = run_rollout("history", "--env", env)
    assert hist.rc == 0, hist
    last = hist.json[-1]
    assert (last["action"], last["release"], last["from_release"]) == (
        "analysis_failed", BAD, BLUE)
    assert "err=" in last["detail"] and "p99=" in last["detail"] and \
        f"rolled back to {BLUE}" in last["detail"]
    # the green instances are deleted (this run created them), blue is whole, no lock
    left = {i.release for i in cloud.list_instances(env)}
    assert left == {BLUE}, left
    state = cloud.find_floating_ip(env).state
    assert state.lock is None and state.live == BLUE

    kinds = [e["type"].rsplit(".", 1)[-1] for e in events]
    assert kinds == ["started", "gated", "switched", "analysis_failed", "rolled_back"], kinds
    for e in events:
        assert e["specversion"] == "1.0" and e["source"] == f"modelserve-rollout/{env}"
        assert e["content_type"].startswith("application/cloudevents+json")
        assert e["data"]["release"] == BAD and e["data"]["from_release"] == BLUE
