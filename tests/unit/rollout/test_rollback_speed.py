"""What makes a rollback fast keeps it safe (issue 14), on the in-memory cloud with real HTTP:

* the observation under the lock reuses the first one's instances and images only when the
  floating IP shows nothing but our own lock changed it; otherwise it observes again;
* the lease is not rewritten before the rollback's self-checked steps while it is fresh,
  yet a lock broken meanwhile still stops the switch (DeployLocked, nothing moved), and a
  lease past its half is renewed;
* the switch probe waits until it has seen the old release, then the new one (bounded).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from rollout import executor, health
from rollout.clouds.base import Lock
from rollout.errors import DeployLocked, PlanError
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


def test_a_rollback_lists_instances_and_images_once_when_nothing_else_changed(cloud):
    deployed(cloud)
    cloud.calls.clear()
    ctx = ctx_for(cloud)
    res = executor.rollback(ctx, RollbackRequest(ENV, ctx.deploy_id))
    assert res["release"] == "a" and live_release(cloud) == "a"
    assert cloud.calls.count("list_instances") == 1
    assert cloud.calls.count("list_releases") == 1
    # lock, switch, unlock: no lease write before the gate, the switch or the verify
    assert cloud.calls.count("update_floating_ip") == 3
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
