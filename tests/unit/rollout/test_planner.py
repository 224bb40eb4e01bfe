"""The pure planner, from data files: tests/data/plan/*.yaml (observed + request -> steps).

Each case file: ``observed`` (releases, instances, fip), ``request`` (``action`` deploy |
rollback | cleanup plus the request's fields), then either ``expect`` (``steps``: a list of
dicts, each a subset of the planned step's dict, in order; optional ``notes`` substrings) or
``error`` (a substring of the PlanError message).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rollout.clouds.base import Deployment, FipState, FloatingIP, Instance, Release, by_newest
from rollout.errors import PlanError
from rollout.planner import (
    CleanupRequest,
    DeployRequest,
    RollbackRequest,
    instance_name,
    plan_cleanup,
    plan_deploy,
    plan_rollback,
)

CASES = sorted((Path(__file__).resolve().parents[2] / "data" / "plan").glob("*.yaml"))


def load_observed(doc: dict, env: str) -> Deployment:
    releases = by_newest([
        Release(id=f"img-{r['release']}", name=f"modelserve-{r['release']}",
                release=r["release"], model_sha256=r.get("sha256", f"sha-{r['release']}"),
                model_accuracy=r.get("accuracy"), built_at=r.get("built_at", ""))
        for r in doc.get("releases", [])
    ])
    instances = tuple(
        Instance(id=i["name"], name=i["name"], env=env, release=i["release"],
                 colour=i.get("colour", "blue"), role=i.get("role", "front"),
                 deploy_id=i.get("deploy", "d1"), status=i.get("status", "RUNNING"),
                 address=f"10.0.0.{n + 2}", port=f"port-{i['name']}",
                 created_at=i.get("created_at", f"2026-11-26T00:00:{n:02d}Z"),
                 model_sha256=f"sha-{i['release']}")
        for n, i in enumerate(doc.get("instances", []))
    )
    fip = None
    if doc.get("fip") is not None:
        f = doc["fip"]
        fip = FloatingIP("fip", "10.9.0.1", env,
                         f"port-{f['target']}" if f.get("target") else None, "1",
                         FipState(live=f.get("live", ""), previous=f.get("previous", "")))
    return Deployment(env, fip, tuple(releases), instances)


def run_case(case: dict):
    req = dict(case["request"])
    action = req.pop("action")
    env = req.setdefault("env", "dev")
    observed = load_observed(case.get("observed", {}), env)
    if action == "deploy":
        req.setdefault("deploy_id", "abc123")
        return plan_deploy(observed, DeployRequest(**req))
    if action == "rollback":
        req.setdefault("deploy_id", "abc123")
        return plan_rollback(observed, RollbackRequest(**req))
    if action == "cleanup":
        if "in_use_elsewhere" in req:
            req["in_use_elsewhere"] = frozenset(req["in_use_elsewhere"])
        return plan_cleanup(observed, CleanupRequest(**req))
    raise AssertionError(f"unknown action {action}")


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_plan_case(path: Path):
    case = yaml.safe_load(path.read_text())
    if "error" in case:
        with pytest.raises(PlanError) as err:
            run_case(case)
        assert case["error"] in str(err.value)
        return
    plan = run_case(case)
    got = [s.to_dict() for s in plan.steps]
    want = case["expect"]["steps"]
    assert [g["kind"] for g in got] == [w["kind"] for w in want], got
    for g, w in zip(got, want, strict=True):
        assert {k: g.get(k) for k in w} == w, g
    for note in case["expect"].get("notes", []):
        assert any(note in n for n in plan.notes), plan.notes


def test_there_are_enough_cases():
    assert len(CASES) >= 12


def test_instance_names_fit_lxd_and_hostnames():
    name = instance_name("production-eu", "r" + "x" * 80, "worker", 12, "deadbeefcafe")
    assert len(name) <= 63 and name.startswith("ms-production-eu-r")
    assert name.endswith("-worker12-deadbe")
    assert instance_name("dev", "R1_2.3", "front", 0, "abc") == "ms-dev-r1-2-3-front0-abc"
