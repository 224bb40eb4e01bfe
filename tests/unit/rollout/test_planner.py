"""The pure planner, from data files: tests/data/plan/*.yaml (observed + request -> steps).

Each case file: ``observed`` (releases, instances, fip), ``request`` (``action`` deploy |
rollback | cleanup plus the request's fields), then either ``expect`` (``steps``: a list of
dicts, each a subset of the planned step's dict, in order; optional ``notes`` substrings) or
``error`` (a substring of the PlanError message).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rollout.clouds.base import (
    Deployment,
    FipState,
    FloatingIP,
    HistoryEvent,
    Instance,
    Release,
    by_newest,
)
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


def _event(n: int, text: str) -> HistoryEvent:
    """``release@deploy_id`` -> a deploy event of that run."""
    release, _, deploy_id = text.partition("@")
    return HistoryEvent(f"2026-11-26T01:{n:02d}:00Z", "deploy", release, "", deploy_id)


def load_observed(doc: dict, env: str) -> Deployment:
    """Releases default to provenance ``release`` and accuracy 0.78 (``accuracy: null`` for
    unknown); an instance's ``port`` defaults to ``port-<name>`` (``port: null``: not known,
    e.g. stopped); ``fip.history`` lists events as ``release@deploy_id`` strings."""
    releases = by_newest([
        Release(id=f"img-{r['release']}", name=f"modelserve-{r['release']}",
                release=r["release"], model_sha256=r.get("sha256", f"sha-{r['release']}"),
                model_accuracy=r.get("accuracy", 0.78), built_at=r.get("built_at", ""),
                provenance=r.get("provenance", "release"),
                accuracy_floor=r.get("accuracy_floor"))
        for r in doc.get("releases", [])
    ])
    instances = tuple(
        Instance(id=i["name"], name=i["name"], env=env, release=i["release"],
                 colour=i.get("colour", "blue"), role=i.get("role", "front"),
                 deploy_id=i.get("deploy", "d1"), status=i.get("status", "RUNNING"),
                 address=f"10.0.0.{n + 2}", port=i.get("port", f"port-{i['name']}"),
                 created_at=i.get("created_at", f"2026-11-26T00:00:{n:02d}Z"),
                 model_sha256=f"sha-{i['release']}")
        for n, i in enumerate(doc.get("instances", []))
    )
    fip = None
    if doc.get("fip") is not None:
        f = doc["fip"]
        target = f.get("target_raw") or (f"port-{f['target']}" if f.get("target") else None)
        history = tuple(_event(n, h) for n, h in enumerate(f.get("history", [])))
        fip = FloatingIP("fip", "10.9.0.1", env, target, "1",
                         FipState(live=f.get("live", ""), previous=f.get("previous", "")),
                         history)
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
        req.pop("deploy_id", None)
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


# -- invariants beyond the data files ----------------------------------------------------------
def _inst(name: str, release: str, deploy: str, status: str = "RUNNING", role: str = "front",
          port: str | None = "same-as-name", address: str | None = "10.0.0.9") -> Instance:
    return Instance(id=name, name=name, env="dev", release=release, colour="blue", role=role,
                    deploy_id=deploy, status=status, address=address,
                    port=name if port == "same-as-name" else port)


def _dep(instances, target=None, live="", previous="", history=()) -> Deployment:
    fip = FloatingIP("fip", "10.9.0.1", "dev", target, "1", FipState(live=live, previous=previous),
                     tuple(_event(n, h) for n, h in enumerate(history)))
    rels = tuple(Release(f"img-{r}", f"modelserve-{r}", r, f"sha-{r}", 0.78, provenance="release")
                 for r in sorted({i.release for i in instances}))
    return Deployment("dev", fip, rels, tuple(instances))


def test_stopped_live_front_is_live_and_shown_as_stopped():
    dep = _dep([_inst("f2", "r2", "d2", status="STOPPED", port=None, address=None)], target="f2")
    assert dep.live == "r2" and dep.live_instance.name == "f2"
    assert dep.live_condition == "stopped"
    assert dep.describe_live() == "r2 (live, stopped)"
    assert not dep.target_missing


def test_running_live_front():
    dep = _dep([_inst("f1", "r1", "d1")], target="f1")
    assert dep.live_condition == "running" and dep.describe_live() == "r1 (live)"


def test_live_is_never_matched_by_address():
    # an instance that got the address the floating IP once pointed at is not live (I2)
    dep = _dep([_inst("f3", "r3", "d3", port="f3", address="10.0.0.7")], target="10.0.0.7")
    assert dep.live_instance is None and dep.target_missing
    assert dep.live_condition == "missing" and "no visible instance" in dep.describe_live()


def test_nothing_live():
    dep = _dep([_inst("f1", "r1", "d1")])
    assert dep.live is None and dep.live_condition == "" and dep.describe_live() == "-"
    assert not dep.target_missing


def test_known_deploy_ids():
    dep = _dep([_inst("f1", "r1", "d1"), _inst("f2", "r2", "d2"), _inst("f9", "r3", "d9")],
               target="f2", previous="r1", history=["r3@d7"])
    assert dep.known_deploy_ids == {"d1", "d2", "d7"}


def test_spared_and_dead_run():
    insts = [_inst("f1", "r1", "d1", status="STOPPED"), _inst("f1x", "r1", "d9"),
             _inst("f2", "r2", "d2", status="ERROR"), _inst("f3", "r3", "d3")]
    dep = _dep(insts, target="f2", previous="r1")
    assert dep.spared() == {"f1", "f1x", "f2"}
    assert dep.spared("d9") == {"f1", "f2"}
    assert dep.spared("d2") == {"f1", "f1x", "f2"}  # the live set stays even if its run died


def test_check_spared_refuses_a_plan_deleting_the_live_front():
    from rollout.planner import DeleteInstances, Plan, check_spared

    dep = _dep([_inst("f1", "r1", "d1"), _inst("f2", "r2", "d2", status="STOPPED")],
               target="f2", previous="r1")
    with pytest.raises(PlanError, match="invariant I1"):
        check_spared(dep, Plan("cleanup", None, (DeleteInstances(("f2",), "x"),)))
    with pytest.raises(PlanError, match="invariant I1"):
        check_spared(dep, Plan("cleanup", None, (DeleteInstances(("f1",), "x"),)))
    check_spared(dep, Plan("cleanup", None, ()))


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_every_planned_case_spares_live_and_previous(path: Path):
    from rollout.planner import check_spared

    case = yaml.safe_load(path.read_text())
    if "error" in case:
        return
    req = case["request"]
    observed = load_observed(case.get("observed", {}), req.get("env", "dev"))
    check_spared(observed, run_case(case), req.get("dead_deploy_id", ""))


def test_default_floor_is_the_committed_bundles():
    from rollout.planner import DEFAULT_ACCURACY_FLOOR

    meta = json.loads((Path(__file__).resolve().parents[3] / "app" / "bundle" /
                       "metadata.json").read_text())
    assert meta["accuracy_floor"] == DEFAULT_ACCURACY_FLOOR
    assert meta["metrics"]["accuracy"] >= DEFAULT_ACCURACY_FLOOR


def test_release_from_properties():
    props = {"modelserve_release": "r1", "modelserve_model_sha256": "abc",
             "modelserve_model_accuracy": "0.79", "modelserve_accuracy_floor": "0.7217",
             "modelserve_provenance": "release", "modelserve_git_sha": "g",
             "modelserve_built_at": ""}
    rel = Release.from_properties("fp", "modelserve-r1", props, created_at="2026")
    assert rel == Release("fp", "modelserve-r1", "r1", "abc", 0.79, "g", "", "2026", "release",
                          0.7217)
    assert rel.is_baked_release
    bad = Release.from_properties("fp", "", {**props, "modelserve_accuracy_floor": "x",
                                             "modelserve_provenance": "standin"})
    assert bad.accuracy_floor is None and not bad.is_baked_release and bad.name == "modelserve-r1"
    assert Release.from_properties("fp", "x", {"os": "debian"}) is None


# -- a property: whatever the observed state, cleanup never deletes live or previous (I1) ----
_statuses = st.sampled_from(["RUNNING", "STOPPED", "BUILDING", "ERROR"])
_instance_specs = st.lists(
    st.tuples(st.sampled_from(["r1", "r2", "r3", "r4"]), st.sampled_from(["d1", "d2", "d3", "d9"]),
              st.sampled_from(["front", "worker"]), _statuses, st.booleans()),
    max_size=8)


@settings(max_examples=300, deadline=None)
@given(specs=_instance_specs, target=st.integers(-1, 8), previous=st.sampled_from(["", "r1", "r2"]),
       history=st.lists(st.sampled_from(["r1@d1", "r2@d2", "r3@d3"]), max_size=3),
       dead=st.sampled_from(["", "d9", "d1"]), keep=st.integers(2, 3), images=st.booleans())
def test_cleanup_never_deletes_live_or_previous(specs, target, previous, history, dead, keep,
                                                images):
    insts, seen = [], set()
    for n, (rel, dep_id, role, status, has_port) in enumerate(specs):
        name = f"ms-dev-{rel}-{role}{n}-{dep_id}"
        if name in seen:
            continue
        seen.add(name)
        insts.append(_inst(name, rel, dep_id, status=status, role=role,
                           port="same-as-name" if has_port else None))
    fronts = [i for i in insts if i.role == "front"]
    tgt = fronts[target % len(fronts)].name if fronts and target >= 0 else None
    dep = _dep(insts, target=tgt, previous=previous, history=history)
    try:
        plan = plan_cleanup(dep, CleanupRequest("dev", keep=keep, images=images,
                                                dead_deploy_id=dead))
    except PlanError:
        return
    deleted = {n for s in plan.steps for n in getattr(s, "instances", ())}
    spared = {i.name for i in insts if i.release in {dep.live, previous} - {None, ""}
              and not (dead and i.deploy_id == dead
                       and (i.release, i.deploy_id) != (dep.live, dep.live_instance.deploy_id
                                                        if dep.live_instance else None))}
    assert not deleted & spared
    if dep.live_instance:
        assert dep.live_instance.name not in deleted


@settings(max_examples=300, deadline=None)
@given(specs=_instance_specs, target=st.integers(-1, 8), previous=st.sampled_from(["", "r1", "r2"]),
       history=st.lists(st.sampled_from(["r1@d1", "r2@d2", "r3@d3"]), max_size=3),
       release=st.sampled_from(["r1", "r2", "r3", "r4"]), workers=st.integers(0, 1),
       keep=st.integers(2, 3), reuse=st.booleans())
def test_deploy_never_deletes_live_or_previous(specs, target, previous, history, release,
                                               workers, keep, reuse):
    from rollout.planner import check_spared

    insts, seen = [], set()
    for n, (rel, dep_id, role, status, has_port) in enumerate(specs):
        name = f"ms-dev-{rel}-{role}{n}-{dep_id}"
        if name not in seen:
            seen.add(name)
            insts.append(_inst(name, rel, dep_id, status=status, role=role,
                               port="same-as-name" if has_port else None))
    fronts = [i for i in insts if i.role == "front"]
    tgt = fronts[target % len(fronts)].name if fronts and target >= 0 else None
    dep = _dep(insts, target=tgt, previous=previous, history=history)
    dep = Deployment(dep.env, dep.fip, tuple(Release(f"img-{r}", f"modelserve-{r}", r, f"sha-{r}",
                                                     0.78, provenance="release")
                                             for r in ("r1", "r2", "r3", "r4")), dep.instances)
    try:
        plan = plan_deploy(dep, DeployRequest("dev", "new123", release=release, workers=workers,
                                              keep=keep, reuse_warm=reuse))
    except PlanError:
        return
    check_spared(dep, plan)
    gates = [s for s in plan.steps if s.kind == "health_gate"]
    assert all(g.full for g in gates)
    reused = [g for g in gates if g.reused]
    for g in reused:  # I11: a reused set is one of a run known to have finished
        front = next(i for i in insts if i.name == g.front)
        assert front.deploy_id in dep.known_deploy_ids and front.status == "RUNNING"
