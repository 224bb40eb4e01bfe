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


def test_cloud_calls_giving_up_is_a_cloud_error_not_a_timeout():
    from rollout.errors import CloudUnavailable

    fn = Flaky(10**6, TransientCloudError("HTTP 503"))
    with pytest.raises(CloudUnavailable, match="cloud-call") as err:
        CLOUD_CALL.run(fn, sleep=Sleeps(), what="listing servers")
    assert isinstance(err.value, CloudError) and not isinstance(err.value, WaitTimeout)


def test_auth_errors_are_never_retried():
    from rollout.errors import AuthError

    fn = Flaky(5, AuthError("HTTP 401"))
    with pytest.raises(AuthError):
        CLOUD_CALL.run(fn, sleep=Sleeps())
    assert fn.calls == 1


def _openstack_translation(exc: BaseException) -> BaseException:
    openstack_cloud = pytest.importorskip("rollout.clouds.openstack")
    try:
        with openstack_cloud.OpenStackCloud._errors(None, "listing servers"):
            raise exc
    except BaseException as out:  # noqa: BLE001
        return out
    raise AssertionError("no error")


def test_openstack_maps_401_403_and_keystone_auth_failures_to_auth_error():
    from keystoneauth1 import exceptions as ks_exc
    from openstack import exceptions as os_exc

    from rollout.errors import AuthError

    for exc in (os_exc.HttpException("denied", http_status=401),
                os_exc.HttpException("forbidden", http_status=403),
                ks_exc.Unauthorized("The request you have made requires authentication."),
                ks_exc.http.Forbidden("no"),
                ks_exc.AuthorizationFailure("bad password")):
        out = _openstack_translation(exc)
        assert isinstance(out, AuthError) and not isinstance(out, TransientCloudError), exc
        assert "not retried" in str(out)
    assert isinstance(_openstack_translation(ks_exc.http.InternalServerError("x")),
                      TransientCloudError)
    out = _openstack_translation(ks_exc.http.BadRequest("x"))
    assert isinstance(out, CloudError) and not isinstance(out, TransientCloudError)
    assert isinstance(_openstack_translation(ks_exc.ConnectFailure("refused")),
                      TransientCloudError)
