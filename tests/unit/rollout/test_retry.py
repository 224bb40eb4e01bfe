"""Named retry policies with an injected sleep: what is retried, how long, what is raised."""

from __future__ import annotations

import pytest

from rollout.errors import CloudError, HealthCheckFailed, TransientCloudError, WaitTimeout
from rollout.retry import CLOUD_CALL, HEALTH_GATE, INSTANCE_BOOT, POLICIES, NotReady, Policy


class Flaky:
    """Fails ``n`` times with ``exc`` then returns 'ok'."""

    def __init__(self, n: int, exc: BaseException):
        self.n, self.exc, self.calls = n, exc, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.n:
            raise self.exc
        return "ok"


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def test_transient_errors_are_retried_with_exponential_backoff():
    sleeps = Sleeps()
    fn = Flaky(4, TransientCloudError("503"))
    assert CLOUD_CALL.run(fn, sleep=sleeps) == "ok"
    assert fn.calls == 5
    assert sleeps == sorted(sleeps) and sleeps[0] >= CLOUD_CALL.wait_min
    assert max(sleeps) <= CLOUD_CALL.wait_max


def test_permanent_errors_are_not_retried():
    sleeps = Sleeps()
    fn = Flaky(1, CloudError("quota exceeded"))
    with pytest.raises(CloudError, match="quota"):
        CLOUD_CALL.run(fn, sleep=sleeps)
    assert fn.calls == 1 and sleeps == []


def test_budget_bounds_the_total_sleep_and_names_the_policy():
    sleeps = Sleeps()
    fn = Flaky(10**6, NotReady("still BUILDING"))
    policy = INSTANCE_BOOT.with_budget(30)
    with pytest.raises(WaitTimeout) as err:
        policy.run(fn, sleep=sleeps, what="waiting for ms-dev-x")
    assert sum(sleeps) <= 30
    assert sum(sleeps) > 30 - INSTANCE_BOOT.wait_max
    msg = str(err.value)
    assert "waiting for ms-dev-x" in msg and "instance-boot" in msg and "still BUILDING" in msg


def test_health_gate_retries_not_ready_until_healthy():
    fn = Flaky(3, NotReady("/readyz 503: worker"))
    assert HEALTH_GATE.run(fn, sleep=Sleeps()) == "ok"


def test_health_gate_fails_fast_on_a_wrong_answer():
    fn = Flaky(3, HealthCheckFailed("serves model sha256 abc, the image says def"))
    with pytest.raises(HealthCheckFailed):
        HEALTH_GATE.run(fn, sleep=Sleeps())
    assert fn.calls == 1


def test_ctrl_c_is_never_swallowed():
    fn = Flaky(1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        HEALTH_GATE.run(fn, sleep=Sleeps())
    assert fn.calls == 1


def test_every_policy_is_named_and_bounded():
    assert set(POLICIES) >= {"cloud-call", "instance-boot", "health-gate", "rollback-health"}
    for name, p in POLICIES.items():
        assert isinstance(p, Policy) and p.name == name
        assert 0 < p.wait_min <= p.wait_max <= p.budget
    assert POLICIES["rollback-health"].budget <= 5  # rollback target: <= 2 s when healthy
