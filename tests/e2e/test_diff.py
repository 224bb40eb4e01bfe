"""The model-diff gate on real LXD: a release whose model flips every label is refused
before the switch (exit 3), the live release keeps serving and the new instances go; with
``--force`` it goes live and history records the override with the figures.

The flipping model comes from the stand-in image itself (``standin-flips``: its server answers
probability 0.75, label 1 where ``standin-a`` answers 0.25, label 0), not from any hook of the
tool. Stand-ins have no ``/api/v1/model/holdout``: the gate uses the tool's own bundle's
held-out rows (332), plus the rows of a ``--diff-sample`` file.
"""

from __future__ import annotations

import json

import pytest

from rollout.health import fetch_version
from tests.e2e.lxdenv import run_rollout
from tests.e2e.standin import build_standin

pytestmark = pytest.mark.e2e
BLUE, FLIPS = "standin-a", "standin-flips"
ROW = {"npreg": 1, "glu": 89, "bp": 66, "skin": 23, "bmi": 28.1, "ped": 0.167, "age": 21}


def test_a_release_that_flips_labels_is_refused_then_forced(cloud, new_env, tmp_path):
    build_standin(BLUE, accuracy=0.78)
    build_standin(FLIPS, accuracy=0.80, flip=True)
    env = new_env("df")
    first = run_rollout("deploy", "--env", env, "--release", BLUE)
    assert first.rc == 0, first
    fip = first.json["floating_ip"]
    sample = tmp_path / "recorded.jsonl"
    sample.write_text(json.dumps({"instances": [ROW, ROW]}) + "\n" + json.dumps(ROW) + "\n")

    res = run_rollout("deploy", "--env", env, "--release", FLIPS, "--diff-sample", str(sample))
    assert res.rc == 3, res
    assert res.json["type"] == "DiffRefused"
    assert "flip rate 100.00%" in res.json["error"]
    assert "--max-disagreement 0.25" in res.json["error"]
    d = res.json["diff"]
    assert d["outcome"] == "refused" and d["rows"] == 335 and d["flipped"] == 335
    assert d["sources"] == {"holdout": 332, "sample": 3}
    assert d["agreement"] == 0.0 and d["max_abs_change"] == d["mean_abs_change"] == 0.5
    assert d["holdout_from"] == "the tool's bundle"
    assert d["flips"][0]["blue"] == {"probability": 0.25, "label": 0}
    assert d["flips"][0]["green"] == {"probability": 0.75, "label": 1}
    assert "held-out rows: the tool's bundle (green has no /api/v1/model/holdout)" in res.err
    assert fetch_version(fip)["release"] == BLUE  # the live release kept serving
    left = {i.release for i in cloud.list_instances(env)}
    assert left == {BLUE}, left  # green (created by this run) is deleted
    state = cloud.find_floating_ip(env).state
    assert state.lock is None and state.live == BLUE

    forced = run_rollout("deploy", "--env", env, "--release", FLIPS, "--force")
    assert forced.rc == 0, forced
    assert forced.json["diff"]["outcome"] == "overridden"
    assert forced.json["diff"]["flip_rate"] == 1.0 and forced.json["diff"]["rows"] == 332
    assert any("model-diff gate overridden (--force)" in n for n in forced.json["notes"])
    assert fetch_version(fip)["release"] == FLIPS
    hist = run_rollout("history", "--env", env)
    assert hist.rc == 0, hist
    last = hist.json[-1]
    assert (last["action"], last["release"], last["from_release"]) == (
        "deploy-forced", FLIPS, BLUE)
    assert "diff flipped=332/332 (100.00%)" in last["detail"], last
    assert "overridden (--force)" in last["detail"]
