"""The executor against an in-memory cloud with real HTTP on loopback (no services).

The invariant of every failure, at any step or in any cloud call, Ctrl-C included: the
floating IP still points at the live release, nothing this run created remains, the lock is
free, and the error is the right class.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from rollout import executor
from rollout.clouds.base import Lock, Release
from rollout.errors import (
    CloudError,
    DeployLocked,
    HealthCheckFailed,
    PlanError,
    RolloutError,
    TransientCloudError,
)
from rollout.planner import DeployRequest, RollbackRequest, Step
from tests.unit.rollout.fakecloud import FakeCloud, free_port

ENV = "dev"


@pytest.fixture
def cloud():
    c = FakeCloud([
        Release("img-a", "modelserve-a", "a", "sha-a", 0.78, built_at="2026-01-01"),
        Release("img-b", "modelserve-b", "b", "sha-b", 0.78, built_at="2026-01-02"),
    ], port=free_port())
    yield c
    c.close()


def ctx_for(cloud: FakeCloud, **kw) -> executor.Context:
    return executor.Context(cloud=cloud, env=ENV, sleep=lambda s: None, port=cloud.port, **kw)


def deploy(cloud, release, workers=0, **kw):
    ctx = ctx_for(cloud, **kw)
    return executor.deploy(ctx, DeployRequest(ENV, ctx.deploy_id, release=release,
                                              workers=workers))


def live_release(cloud) -> str | None:
    fip = cloud.fips.get(ENV)
    inst = next((i for i in cloud.instances.values() if fip and i.port == fip.target), None)
    return inst.release if inst else None


def test_deploy_rollback_forward(cloud):
    res = deploy(cloud, "a")
    assert res["release"] == "a" and live_release(cloud) == "a"
    res = deploy(cloud, "b")
    assert res["from_release"] == "a" and live_release(cloud) == "b"
    assert res["switch_to_traffic_s"] is not None
    ctx = ctx_for(cloud)
    executor.rollback(ctx, RollbackRequest(ENV, ctx.deploy_id))
    assert live_release(cloud) == "a"
    before = set(cloud.instances)
    res = deploy(cloud, "b")  # warm: reused, nothing launched
    assert live_release(cloud) == "b" and set(cloud.instances) == before
    assert "launch_front" not in [s["kind"] for s in res["steps"]]
    fip = cloud.fips[ENV]
    assert fip.state.lock is None and fip.state.previous == "a"
    assert [(e.action, e.release) for e in fip.history] == [
        ("deploy", "a"), ("deploy", "b"), ("rollback", "a"), ("deploy", "b")]
    st = executor.status(ctx_for(cloud))
    assert st["live"] == "b" and st["previous"] == "a" and st["lock"] is None


def _assert_untouched(cloud, before_ids, live="a"):
    assert live_release(cloud) == live
    assert set(cloud.instances) == before_ids
    assert cloud.fips[ENV].state.lock is None


@pytest.mark.parametrize("kind", ["launch_front", "health_gate", "switch", "verify"])
@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RolloutError("boom")],
                         ids=["ctrl-c", "error"])
def test_failure_before_any_step_leaves_live_serving(cloud, kind, exc):
    deploy(cloud, "a")
    before = set(cloud.instances)

    def before_step(step: Step):
        if step.kind == kind:
            raise exc

    with pytest.raises(type(exc)):
        deploy(cloud, "b", before_step=before_step)
    if kind == "verify":  # the switch verified itself: B is live, and must stay whole
        assert live_release(cloud) == "b" and cloud.fips[ENV].state.lock is None
        assert {i.release for i in cloud.instances.values()} == {"a", "b"}
        return
    _assert_untouched(cloud, before)


def _fail_switch(cloud):
    orig = cloud.update_floating_ip

    def update(fip, *, target, state, if_revision):
        if target != fip.target:  # the switch (lock updates keep the target)
            raise CloudError("neutron 500")
        return orig(fip, target=target, state=state, if_revision=if_revision)
    cloud.update_floating_ip = update


def _fail_worker(cloud):
    orig = cloud.create_instance

    def create(spec):
        if spec.labels["role"] == "worker":
            raise CloudError("quota exceeded")
        return orig(spec)
    cloud.create_instance = create


def _instance_error(cloud):
    cloud.fail["get_instance"] = [CloudError("instance went to ERROR")]


@pytest.mark.parametrize("breaker", [_fail_switch, _fail_worker, _instance_error])
def test_cloud_failure_leaves_live_serving(cloud, breaker):
    deploy(cloud, "a")
    before = set(cloud.instances)
    breaker(cloud)
    with pytest.raises(CloudError):
        deploy(cloud, "b", workers=1)
    _assert_untouched(cloud, before)


def test_transient_errors_are_retried(cloud):
    cloud.fail["create_instance"] = [TransientCloudError("503"), TransientCloudError("503")]
    cloud.fail["list_releases"] = [TransientCloudError("reset")]
    deploy(cloud, "a")
    assert live_release(cloud) == "a"
    assert cloud.calls.count("create_instance") == 3


def test_unhealthy_release_is_refused(cloud):
    deploy(cloud, "a")
    before = set(cloud.instances)
    cloud.unready_releases.add("b")
    with pytest.raises(HealthCheckFailed, match="did not become healthy"):
        deploy(cloud, "b", health_timeout=5)
    _assert_untouched(cloud, before)
    last = cloud.fips[ENV].history[-1]  # history tells the story of the refused release
    assert (last.action, last.release, last.from_release) == ("failed", "b", "a")
    assert "did not become healthy" in last.detail and ";" not in last.detail


def test_wrong_model_is_refused(cloud):
    deploy(cloud, "a")
    before = set(cloud.instances)
    cloud.releases = [r if r.release != "b" else Release("img-b", "modelserve-b", "b", "sha-x",
                                                         0.78, built_at="2026-01-02")
                      for r in cloud.releases]
    # the app serves the image's sha; make the image claim another one after launch
    orig = cloud.create_instance

    def create(spec):
        inst = orig(spec)
        cloud.apps[inst.id].sha = "sha-served"
        return inst
    cloud.create_instance = create
    with pytest.raises(HealthCheckFailed, match="refusing to switch"):
        deploy(cloud, "b")
    _assert_untouched(cloud, before)


def test_a_held_lock_fails_fast_and_can_be_broken(cloud):
    deploy(cloud, "a")
    ctx = ctx_for(cloud)
    with executor.env_lock(ctx):
        with pytest.raises(DeployLocked, match="locked by"):
            deploy(cloud, "b")
    # a dead holder: the lock stays; cleanup --break-lock takes it over and frees it
    fip = cloud.fips[ENV]
    cloud.fips[ENV] = replace(fip, state=replace(fip.state, lock=Lock("x@y:1", "t", "dead")))
    with pytest.raises(DeployLocked):
        deploy(cloud, "b")
    executor.cleanup(ctx_for(cloud), keep=2, images=False, break_lock=True)
    assert cloud.fips[ENV].state.lock is None
    deploy(cloud, "b")
    assert live_release(cloud) == "b"


def test_rollback_without_previous_is_a_plan_error(cloud):
    deploy(cloud, "a")
    ctx = ctx_for(cloud)
    with pytest.raises(PlanError, match="no previous release"):
        executor.rollback(ctx, RollbackRequest(ENV, ctx.deploy_id))
    assert cloud.fips[ENV].state.lock is None


def test_cleanup_removes_orphans_but_never_live_or_previous(cloud):
    cloud.releases.append(Release("img-c", "modelserve-c", "c", "sha-c", 0.78, built_at="2025"))
    deploy(cloud, "a")
    deploy(cloud, "b")
    before = set(cloud.instances)

    def die(step: Step):  # a run that dies after launching, without undo (SIGKILL)
        if step.kind == "health_gate":
            raise SystemExit(137)

    ctx = ctx_for(cloud, before_step=die)
    ex = executor.Executor(ctx, executor.observe(ctx), None,
                           executor.plan_deploy(executor.observe(ctx),
                                                DeployRequest(ENV, ctx.deploy_id, release="c")))
    ex.undo = lambda exc: None  # SIGKILL: no undo
    with pytest.raises(SystemExit):
        ex.apply()
    assert len(cloud.instances) == len(before) + 1
    executor.cleanup(ctx_for(cloud), keep=2, images=False, break_lock=False)
    assert set(cloud.instances) == before and live_release(cloud) == "b"


def test_destroy_removes_the_env_and_respects_a_lock(cloud):
    deploy(cloud, "a")
    deploy(cloud, "b")
    ctx = ctx_for(cloud)
    with executor.env_lock(ctx):
        with pytest.raises(DeployLocked):
            executor.destroy(ctx_for(cloud))
    res = executor.destroy(ctx_for(cloud))
    assert len(res["deleted"]) == 2 and cloud.instances == {} and ENV not in cloud.fips


def test_every_cloud_method_is_bounded_by_a_retry_policy(cloud):
    """Invariant I6: the context's cloud is a BoundedCloud with exactly the protocol's
    methods, each retrying a transient error under a named policy."""
    from rollout.bounded import BoundedCloud
    from rollout.clouds.base import Cloud, HistoryEvent, InstanceSpec
    from rollout.seed import Credentials, SeedParams, render_user_data

    def public(cls):
        return {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}
    assert public(Cloud) == public(BoundedCloud) - {"unwraps"}
    deploy(cloud, "a")
    ctx = ctx_for(cloud)
    bc = ctx.cloud
    assert isinstance(bc, BoundedCloud)
    inst = next(iter(cloud.instances.values()))
    rel = cloud.releases[0]
    spec = InstanceSpec("ms-dev-b-x", rel, {"env": ENV, "release": "b", "colour": "green",
                                            "role": "worker", "deploy_id": "x",
                                            "created_at": "", "model_sha256": "sha-b"},
                        render_user_data(SeedParams(role="worker", colour="green", release="b",
                                                    deploy_id="x", env=ENV,
                                                    credentials=Credentials.generate())))
    calls = {
        "list_releases": lambda: bc.list_releases(),
        "find_release": lambda: bc.find_release("a"),
        "list_instances": lambda: bc.list_instances(ENV),
        "find_instance": lambda: bc.find_instance(inst.id),
        "get_instance": lambda: bc.wait_for_instance(inst.id, timeout=5),
        "create_instance": lambda: bc.create_instance(spec),
        "find_floating_ip": lambda: bc.find_floating_ip(ENV),
        "update_floating_ip": lambda: bc.update_floating_ip(
            cloud.fips[ENV], target=cloud.fips[ENV].target, state=cloud.fips[ENV].state,
            if_revision=cloud.fips[ENV].revision),
        "record_event": lambda: bc.record_event(cloud.fips[ENV], HistoryEvent("t", "deploy", "a")),
        "create_floating_ip": lambda: bc.create_floating_ip("other"),
        "delete_instance": lambda: bc.delete_instance("id-ms-dev-b-x"),
        "delete_floating_ip": lambda: bc.delete_floating_ip(cloud.fips["other"]),
        "delete_release": lambda: bc.delete_release(rel),
    }
    for method, call in calls.items():
        cloud.fail[method] = [TransientCloudError("503")]
        before = cloud.calls.count(method)
        call()
        assert cloud.calls.count(method) == before + 2 and not cloud.fail[method], method


def test_a_signal_after_the_switch_before_verify_switches_back(cloud, monkeypatch):
    from rollout import health
    from rollout.errors import Cancelled

    deploy(cloud, "a")
    before, target = set(cloud.instances), cloud.fips[ENV].target

    def fetch(address, port=8080):
        raise Cancelled(15)  # SIGTERM lands while verifying through the floating IP
    monkeypatch.setattr(health, "fetch_version", fetch)
    with pytest.raises(Cancelled):
        deploy(cloud, "b")
    assert cloud.fips[ENV].target == target and live_release(cloud) == "a"
    _assert_untouched(cloud, before)


def test_undo_does_not_switch_back_over_a_lock_that_is_no_longer_ours(cloud, monkeypatch):
    from rollout import health

    deploy(cloud, "a")
    other = Lock("x@elsewhere:1", "t", "thief1", "")

    def fetch(address, port=8080):  # our lock is broken while we verify
        fip = cloud.fips[ENV]
        cloud.fips[ENV] = replace(fip, state=replace(fip.state, lock=other))
        raise HealthCheckFailed("verify failed")
    monkeypatch.setattr(health, "fetch_version", fetch)
    with pytest.raises(HealthCheckFailed) as err:
        deploy(cloud, "b")
    assert live_release(cloud) == "b", "another run holds the env now: not ours to move"
    assert cloud.fips[ENV].state.lock == other  # and b's front is kept: the FIP points at it
    assert any("not switching the floating IP back" in n for n in err.value.__notes__)


def test_signals_during_undo_are_deferred_and_the_first_error_wins(cloud):
    import os
    import signal

    from rollout import cancel
    from rollout.errors import Cancelled

    deploy(cloud, "a")
    before = set(cloud.instances)
    orig = cloud.delete_instance

    def delete(instance_id, **kw):  # a second and third signal arrive mid-undo
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        return orig(instance_id, **kw)
    cloud.delete_instance = delete

    def cancel_at_gate(step):
        if step.kind == "health_gate":
            raise Cancelled(signal.SIGHUP)
    previous = cancel.install()
    try:
        with pytest.raises(Cancelled) as err:
            deploy(cloud, "b", workers=1, before_step=cancel_at_gate)
    finally:
        cancel.restore(previous)
    assert err.value.signum == signal.SIGHUP and err.value.exit_code == 129
    _assert_untouched(cloud, before)
    assert not cancel._pending  # the deferred signals do not leak into a later run


def test_a_signal_while_creating_an_instance_still_deletes_it(cloud):
    from rollout.errors import Cancelled

    deploy(cloud, "a")
    before = set(cloud.instances)
    orig = cloud.create_instance

    def create(spec):  # the cloud created it; the signal lands before the call returns
        orig(spec)
        raise Cancelled(2)
    cloud.create_instance = create
    with pytest.raises(Cancelled):
        deploy(cloud, "b")
    _assert_untouched(cloud, before)


def test_a_reused_warm_set_that_fails_its_gate_is_replaced_by_a_fresh_one(cloud):
    deploy(cloud, "a")
    deploy(cloud, "b")
    ctx = ctx_for(cloud)
    executor.rollback(ctx, RollbackRequest(ENV, ctx.deploy_id))
    warm_b = next(i for i in cloud.instances.values() if i.release == "b")
    cloud.apps[warm_b.id].ready = False  # the warm set went bad while it waited
    res = deploy(cloud, "b", health_timeout=2)
    assert live_release(cloud) == "b" and cloud.fips[ENV].target != warm_b.port
    assert "launch_front" in [s["kind"] for s in res["steps"]]
    assert cloud.fips[ENV].state.lock is None


def test_forced_deploy_below_the_floor_is_recorded_in_history(cloud):
    cloud.releases.append(Release("img-w", "modelserve-w", "w", "sha-w", 0.10,
                                  built_at="2026-01-03", provenance="release",
                                  accuracy_floor=0.72))
    deploy(cloud, "a")
    ctx = ctx_for(cloud)
    with pytest.raises(PlanError, match="--force"):
        executor.deploy(ctx, DeployRequest(ENV, ctx.deploy_id, release="w"))
    assert live_release(cloud) == "a"
    ctx = ctx_for(cloud)
    executor.deploy(ctx, DeployRequest(ENV, ctx.deploy_id, release="w", force=True))
    assert live_release(cloud) == "w"
    assert [(e.action, e.release) for e in cloud.fips[ENV].history] == [
        ("deploy", "a"), ("deploy-forced", "w")]


def test_a_switch_that_did_not_move_traffic_restores_the_recorded_state(cloud):
    """The cloud accepts the switch but keeps the old target (a lying API): the check through
    the floating IP fails, and the env's recorded live/previous go back to what they were."""
    deploy(cloud, "a")
    before = set(cloud.instances)
    orig = cloud.update_floating_ip

    def update(fip, *, target, state, if_revision):
        return orig(fip, target=fip.target, state=state, if_revision=if_revision)

    cloud.update_floating_ip = update
    with pytest.raises(HealthCheckFailed, match="did not serve"):
        deploy(cloud, "b")
    fip = cloud.fips[ENV]
    assert fip.state.live == "a" and fip.state.previous == "" and fip.state.lock is None
    _assert_untouched(cloud, before)
