"""What makes a rollback fast keeps it safe (issue 14), on the in-memory cloud with real HTTP:

* with nobody holding the env's lock, the switch is one compare-and-swap from the observed
  revision (no lock, no unlock); any change to the floating IP after the observation makes
  it lose with nothing moved, and the rollback then runs under the lock: a lock taken
  meanwhile stops it (DeployLocked), a lock taken and released meanwhile is observed again;
* a lock-free rollback whose switch fails verification does not switch back across a lock
  another run took meanwhile;
* the observation under the lock reuses the first one's instances and images only when the
  floating IP shows nothing but our own lock changed it; otherwise it observes again;
* the lease is not rewritten before the rollback's self-checked steps while it is fresh,
  yet a lock broken meanwhile still stops the switch (DeployLocked, nothing moved), and a
  lease past its half is renewed;
* the switch probe waits until it has seen the old release, then the new one (bounded);
* on a cloud whose reads may run concurrently (OpenStack) the observation's three reads run
  side by side, and give the same observation; a failed read fails it.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from rollout import executor, health
from rollout.clouds.base import Lock
from rollout.errors import CloudError, DeployLocked, PlanError
from rollout.planner import DeployRequest, RollbackRequest
from tests.unit.rollout.fakecloud import FakeCloud, ctx_for

ENV = "dev"


@pytest.fixture
def cloud(fake_cloud):
    return fake_cloud("ab")


def deployed(cloud) -> FakeCloud:
    for rel in ("a", "b"):
        ctx = ctx_for(cloud)
        executor.deploy(ctx, DeployRequest(ENV, ctx.deploy_id, release=rel))
    return cloud


def live_release(cloud) -> str | None:
    fip = cloud.fips.get(ENV)
    inst = next((i for i in cloud.instances.values() if fip and i.port == fip.target), None)
    return inst.release if inst else None


def bump(cloud, times: int = 1) -> None:
    """Another run's CAS updates of the floating IP (its lock taken, released)."""
    for _ in range(times):
        fip = cloud.fips[ENV]
        cloud.update_floating_ip(fip, target=fip.target, state=fip.state,
                                 if_revision=fip.revision)


def dead_lock(cloud) -> None:
    """A lock left by a run on another host whose lease ran out: the next rollback takes it
    over, so it runs the locked way."""
    fip = cloud.fips[ENV]
    gone = Lock("ghost@elsewhere:9", "2026-01-01T00:00:00Z", "ghost1", "2026-01-01T00:05:00Z")
    cloud.update_floating_ip(fip, target=fip.target, state=replace(fip.state, lock=gone),
                             if_revision=fip.revision)


def test_a_rollback_nobody_else_touches_is_one_floating_ip_update(cloud):
    deployed(cloud)
    before = cloud.fips[ENV].revision
    cloud.calls.clear()
    ctx = ctx_for(cloud)
    res = executor.rollback(ctx, RollbackRequest(ENV, ctx.deploy_id))
    assert res["release"] == "a" and live_release(cloud) == "a"
    assert cloud.calls.count("list_instances") == 1
    assert cloud.calls.count("list_releases") == 1
    # the switch only: no lock, no lease write, no unlock
    assert cloud.calls.count("update_floating_ip") == 1
    fip = cloud.fips[ENV]
    assert (fip.state.live, fip.state.previous, fip.state.lock) == ("a", "b", None)
    assert int(fip.revision) == int(before) + 1
    assert [(e.action, e.release) for e in fip.history][-1] == ("rollback", "a")


def test_a_lock_taken_between_observation_and_switch_stops_the_rollback(cloud):
    deployed(cloud)
    other = Lock("other@elsewhere:9", "2026-01-01T00:00:00Z", "other1", "2099-01-01T00:00:00Z")

    def take_lock(step):
        if step.kind == "health_gate":
            fip = cloud.fips[ENV]
            cloud.update_floating_ip(fip, target=fip.target,
                                     state=replace(fip.state, lock=other),
                                     if_revision=fip.revision)

    ctx = ctx_for(cloud, before_step=take_lock)
    with pytest.raises(DeployLocked, match="other@elsewhere"):
        executor.rollback(ctx, RollbackRequest(ENV, ctx.deploy_id))
    fip = cloud.fips[ENV]
    assert live_release(cloud) == "b" and fip.state.live == "b"  # nothing moved
    assert fip.state.lock == other  # and the other run's lock is untouched


def test_a_change_between_observation_and_switch_is_observed_again_under_the_lock(cloud):
    deployed(cloud)
    seen: list[str] = []

    def lock_and_unlock(step):  # another run's lock taken and released, once
        seen.append(step.kind)
        if seen.count("health_gate") == 1 and step.kind == "health_gate":
            bump(cloud, 2)

    ctx = ctx_for(cloud, before_step=lock_and_unlock)
    cloud.calls.clear()
    res = executor.rollback(ctx, RollbackRequest(ENV, ctx.deploy_id))
    assert res["release"] == "a" and live_release(cloud) == "a"
    assert seen.count("health_gate") == 2  # gated again after observing again
    assert cloud.calls.count("list_instances") == 2
    # the lost CAS (nothing moved), then lock, switch, unlock
    assert cloud.calls.count("update_floating_ip") == 2 + 1 + 3
    assert cloud.fips[ENV].state.lock is None


def test_a_lock_free_switch_is_not_undone_across_another_runs_lock(cloud):
    deployed(cloud)
    other = Lock("other@elsewhere:9", "2026-01-01T00:00:00Z", "other1", "2099-01-01T00:00:00Z")
    real_seen = executor.Executor._seen

    def seen_then_locked(self, release, address, what="the floating IP"):
        fip = cloud.fips[ENV]  # a deploy locks the env right after our switch ...
        cloud.update_floating_ip(fip, target=fip.target, state=replace(fip.state, lock=other),
                                 if_revision=fip.revision)
        raise executor.HealthCheckFailed("injected: verification failed")  # ... then this

    ctx = ctx_for(cloud)
    executor.Executor._seen = seen_then_locked
    try:
        with pytest.raises(executor.HealthCheckFailed) as err:
            executor.rollback(ctx, RollbackRequest(ENV, ctx.deploy_id))
    finally:
        executor.Executor._seen = real_seen
    fip = cloud.fips[ENV]
    assert fip.state.lock == other and live_release(cloud) == "a"  # not switched back
    assert "locked by other@elsewhere" in executor.also_text(err.value)


def test_a_rollback_locks_when_a_dead_runs_lock_is_in_the_way(cloud):
    deployed(cloud)
    dead_lock(cloud)
    cloud.calls.clear()
    ctx = ctx_for(cloud)
    res = executor.rollback(ctx, RollbackRequest(ENV, ctx.deploy_id))
    assert res["release"] == "a" and live_release(cloud) == "a"
    assert ctx.took_over is not None and ctx.took_over.deploy_id == "ghost1"
    assert cloud.calls.count("update_floating_ip") == 3  # lock (takeover), switch, unlock
    assert cloud.fips[ENV].state.lock is None


def test_the_first_observation_serves_only_after_our_own_lock(cloud):
    deployed(cloud)
    ctx = ctx_for(cloud)
    first = executor.observe(ctx)
    bump(cloud)  # our lock
    cloud.calls.clear()
    again = executor._observe_again(ctx, first)  # noqa: SLF001
    assert again.instances is first.instances and again.fip == cloud.fips[ENV]
    assert cloud.calls == ["find_floating_ip"]


def test_a_change_by_another_run_between_is_observed(cloud):
    deployed(cloud)
    ctx = ctx_for(cloud)
    first = executor.observe(ctx)
    gone = next(i for i in cloud.instances.values() if i.release == "a")
    bump(cloud, 1)  # another run's lock ...
    cloud.delete_instance(gone.id)  # ... retires a ...
    bump(cloud, 1)  # ... and unlocks; then our lock
    bump(cloud, 1)
    again = executor._observe_again(ctx, first)  # noqa: SLF001
    assert gone.id not in {i.id for i in again.instances}
    with pytest.raises(PlanError, match="no healthy running instances"):
        executor.plan_rollback(again, RollbackRequest(ENV, ctx.deploy_id))


def test_a_lock_taken_over_means_observing_again(cloud):
    deployed(cloud)
    ctx = ctx_for(cloud)
    first = executor.observe(ctx)
    bump(cloud)
    ctx.took_over = Lock("someone@host:1", "2026-01-01T00:00:00Z", "dead01")
    cloud.calls.clear()
    executor._observe_again(ctx, first)  # noqa: SLF001
    assert "list_instances" in cloud.calls


def test_a_lock_broken_during_the_gate_still_stops_the_switch(cloud):
    deployed(cloud)
    dead_lock(cloud)  # the locked way

    def break_lock(step):
        if step.kind == "health_gate":
            fip = cloud.fips[ENV]
            other = Lock("other@elsewhere:9", "2026-01-01T00:00:00Z", "other1")
            cloud.update_floating_ip(fip, target=fip.target,
                                     state=replace(fip.state, lock=other),
                                     if_revision=fip.revision)

    ctx = ctx_for(cloud, before_step=break_lock)
    with pytest.raises(DeployLocked):
        executor.rollback(ctx, RollbackRequest(ENV, ctx.deploy_id))
    assert live_release(cloud) == "b"
    assert cloud.fips[ENV].state.lock.deploy_id == "other1"  # never ours to release


def test_a_lease_past_its_half_is_renewed_before_each_step(cloud):
    deployed(cloud)
    dead_lock(cloud)  # the locked way
    ctx = ctx_for(cloud, lease_s=0.0)  # a lease that is always past its half: renewed
    cloud.calls.clear()
    executor.rollback(ctx, RollbackRequest(ENV, ctx.deploy_id))
    assert live_release(cloud) == "a"
    assert cloud.calls.count("update_floating_ip") == 3 + 3  # + one renewal per step


def test_the_switch_probe_waits_to_see_each_release(cloud):
    deployed(cloud)
    fip = cloud.fips[ENV]
    probe = health.Probe(fip.address, port=cloud.port).start()
    try:
        assert probe.wait_seen(lambda r: r == "b", at_most=5)
        assert probe.result.by_release["b"] >= 2
        assert not probe.wait_seen(lambda r: r == "a", at_most=0.05)  # bounded
    finally:
        probe.stop()


def test_the_observation_reads_side_by_side_when_the_cloud_allows_it(cloud):
    deployed(cloud)
    sequential = executor.observe(ctx_for(cloud))
    cloud.concurrent_reads = True
    # each read waits until all three have started: only run side by side can they finish
    barrier = threading.Barrier(3, timeout=5)
    for name in ("find_floating_ip", "list_releases", "list_instances"):
        real = getattr(cloud, name)

        def together(*args, _real=real, **kw):
            barrier.wait()
            return _real(*args, **kw)
        setattr(cloud, name, together)
    ctx = ctx_for(cloud)
    assert ctx.cloud.concurrent_reads
    assert executor.observe(ctx) == sequential


def test_a_failed_read_fails_the_side_by_side_observation(cloud):
    deployed(cloud)
    cloud.concurrent_reads = True

    def broken():
        raise CloudError("injected: Glance is down")
    cloud.list_releases = broken
    with pytest.raises(CloudError, match="Glance is down"):
        executor.observe(ctx_for(cloud))
