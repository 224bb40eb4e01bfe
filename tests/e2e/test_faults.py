"""The fault matrix on real LXD: every case ends with the live release serving, no orphans
after ``cleanup``, and the right exit status.

Faults are real (a release whose /readyz fails, a wrong model, SIGKILL and SIGINT of the
rollout process, a concurrent deploy, deleted instances) or injected at the Cloud boundary
(a wrapper around the real LXDCloud whose chosen call fails). Cases run in file order against
one env where release A is live; each leaves A live.

A is the e2e tier's release A (the real image when ROLLOUT_E2E_IMAGES=real). The green side of
the cases that test the tool's own undo paths is the stand-in release ``standin-b`` (launches
in seconds); the seed-credentials case uses release B, the real app when real.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import time

import pytest
from conftest import PY, ROOT, destroy_env, images_mode, run_rollout
from standin import build_standin

from rollout import cli, executor
from rollout.clouds.base import BUILDING, CloudBase
from rollout.errors import CloudError, TransientCloudError
from rollout.health import fetch_version
from rollout.seed import parse_user_data

pytestmark = pytest.mark.e2e
Exit = cli.ExitCode


# -- helpers --------------------------------------------------------------------------------
class Wrapped:
    """The real cloud with some calls replaced (fault injection at the protocol boundary)."""

    wait_for_instance = CloudBase.wait_for_instance  # polls *our* get_instance

    def __init__(self, inner, **overrides):
        self._inner = inner
        self.name = inner.name
        for key, fn in overrides.items():
            setattr(self, key, fn)

    def __getattr__(self, item):
        return getattr(self._inner, item)


def run_inproc(argv: list[str], cloud, configure=None) -> tuple[int, str]:
    err = io.StringIO()
    rc = cli.run(argv, stdout=io.StringIO(), stderr=err, cloud=cloud, configure=configure)
    return rc, err.getvalue()


def serving(fip: str, release: str) -> None:
    assert fetch_version(fip)["release"] == release


def no_orphans(cloud, env: str, allowed: set[str]) -> None:
    res = run_rollout("cleanup", "--env", env)
    assert res.rc == 0, res
    left = {(i.release, i.status) for i in cloud.list_instances(env)}
    assert {r for r, _ in left} <= allowed, left
    assert all(s == "RUNNING" for _, s in left), left
    fip = cloud.find_floating_ip(env)
    assert fip is not None and fip.state.lock is None


def instances_of(cloud, env: str, release: str):
    return [i for i in cloud.list_instances(env) if i.release == release]


def start_deploy(env: str, release: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "rollout", "deploy", "--env", env, "--release", release,
                             "--json", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until(pred, timeout: float = 120.0, what: str = "") -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(cloud, releases):
    """One env with release A live, and the green release G of the tool-fault cases."""
    a, _ = releases
    g = "standin-b"
    build_standin(g, accuracy=0.80)
    env = f"fx{int(time.time()) % 100000}"
    res = run_rollout("deploy", "--env", env, "--release", a)
    assert res.rc == 0, res
    yield env, res.json["floating_ip"], a, g
    destroy_env(cloud, env)


@pytest.fixture(scope="module")
def broken_releases(cloud):
    """Stand-in releases that are broken on purpose."""
    return {
        "readyz": build_standin("standin-broken", fail_readyz=True, accuracy=0.80),
        "sha": build_standin("standin-wrongsha", claimed_sha="0" * 64, accuracy=0.80),
        "worse": build_standin("standin-worse", accuracy=0.10),
    }


# -- the cases ------------------------------------------------------------------------------
def test_release_failing_readyz_is_refused(cloud, live, broken_releases):
    env, fip, a, _ = live
    res = run_rollout("deploy", "--env", env, "--release", "standin-broken",
                      "--health-timeout", "15")
    assert res.rc == Exit.UNHEALTHY, res
    assert "did not become healthy" in res.json["error"] and "/readyz 503" in res.json["error"]
    assert instances_of(cloud, env, "standin-broken") == []  # removed without any cleanup
    serving(fip, a)
    no_orphans(cloud, env, {a})


def test_wrong_model_is_refused_at_once(cloud, live, broken_releases):
    env, fip, a, _ = live
    res = run_rollout("deploy", "--env", env, "--release", "standin-wrongsha")
    assert res.rc == Exit.UNHEALTHY, res
    assert "refusing to switch" in res.json["error"]
    assert instances_of(cloud, env, "standin-wrongsha") == []
    serving(fip, a)
    no_orphans(cloud, env, {a})


def test_worse_model_is_refused_without_force(cloud, live, broken_releases):
    env, fip, a, _ = live
    res = run_rollout("deploy", "--env", env, "--release", "standin-worse")
    assert res.rc == Exit.PLAN, res
    assert "--force" in res.json["error"]
    plan = run_rollout("plan", "--env", env, "--release", "standin-worse", "--force")
    assert plan.rc == 0 and "overridden" in " ".join(plan.json["notes"])
    assert instances_of(cloud, env, "standin-worse") == []
    serving(fip, a)


def test_seed_with_bad_credentials_is_refused(cloud, live, releases):
    """The seed the front gets is corrupted in flight (bad broker password in the URL; the
    stand-in app checks no broker, so there the seed's deploy id is corrupted instead)."""
    env, fip, a, _ = live
    b = releases[1]
    real = images_mode() == "real"

    def create_instance(spec):
        values = parse_user_data(spec.user_data)
        if real:
            good = values["MODELSERVE_BROKER_PASSWORD"]
            text = spec.user_data.replace(f":{good}@", ":wrong-password@")
        else:
            text = spec.user_data.replace(f"DEPLOY_ID={values['MODELSERVE_DEPLOY_ID']}",
                                          "DEPLOY_ID=forged")
        assert text != spec.user_data
        return cloud.create_instance(type(spec)(spec.name, spec.release, spec.labels, text,
                                                spec.flavor))

    rc, err = run_inproc(["deploy", "--env", env, "--release", b, "--health-timeout", "45"],
                         Wrapped(cloud, create_instance=create_instance))
    assert rc == Exit.UNHEALTHY, err
    assert instances_of(cloud, env, b) == []
    serving(fip, a)
    no_orphans(cloud, env, {a})


def test_floating_ip_update_failing_leaves_live_untouched(cloud, live):
    env, fip, a, b = live
    before = cloud.find_floating_ip(env).target

    def update_floating_ip(f, *, target, state, if_revision):
        if target != f.target:  # the switch itself (lock updates keep the target)
            raise CloudError("injected: Neutron said 500 to the switch, permanently")
        return cloud.update_floating_ip(f, target=target, state=state, if_revision=if_revision)

    rc, err = run_inproc(["deploy", "--env", env, "--release", b],
                         Wrapped(cloud, update_floating_ip=update_floating_ip))
    assert rc == Exit.CLOUD, err
    assert "injected" in err
    assert cloud.find_floating_ip(env).target == before
    assert instances_of(cloud, env, b) == []
    serving(fip, a)
    no_orphans(cloud, env, {a})


def test_switch_that_does_not_take_traffic_is_reverted(cloud, live):
    """The update 'succeeds' but traffic still goes to A: the post-switch check fails and the
    floating IP is put back, the green instance removed."""
    env, fip, a, b = live

    def update_floating_ip(f, *, target, state, if_revision):
        if target != f.target:
            target = f.target  # lie: keep pointing at the old front
        return cloud.update_floating_ip(f, target=target, state=state, if_revision=if_revision)

    saved = executor.VERIFY_SWITCH
    executor.VERIFY_SWITCH = saved.with_budget(3)  # fail the post-switch check quickly
    try:
        rc, err = run_inproc(["deploy", "--env", env, "--release", b],
                             Wrapped(cloud, update_floating_ip=update_floating_ip))
    finally:
        executor.VERIFY_SWITCH = saved
    assert rc == Exit.UNHEALTHY, err
    assert "did not serve" in err
    assert instances_of(cloud, env, b) == []
    st = cloud.find_floating_ip(env)
    assert st.state.live == a and st.state.lock is None
    serving(fip, a)
    no_orphans(cloud, env, {a})


def test_worker_launch_failure_removes_the_front(cloud, live):
    env, fip, a, b = live
    seen = []

    def create_instance(spec):
        seen.append(spec.labels["role"])
        if spec.labels["role"] == "worker":
            raise CloudError("injected: quota exceeded for instances")
        return cloud.create_instance(spec)

    rc, err = run_inproc(["deploy", "--env", env, "--release", b, "--workers", "1"],
                         Wrapped(cloud, create_instance=create_instance))
    assert rc == Exit.CLOUD, err
    assert seen == ["front", "worker"]
    assert instances_of(cloud, env, b) == []
    serving(fip, a)
    no_orphans(cloud, env, {a})


def test_boot_timeout_removes_the_instance(cloud, live):
    env, fip, a, b = live

    def get_instance(instance_id):
        inst = cloud.get_instance(instance_id)
        return type(inst)(**{**inst.__dict__, "status": BUILDING, "address": None})

    rc, err = run_inproc(["deploy", "--env", env, "--release", b, "--boot-timeout", "4"],
                         Wrapped(cloud, get_instance=get_instance))
    assert rc == Exit.TIMEOUT, err
    assert "instance-boot" in err
    assert instances_of(cloud, env, b) == []
    serving(fip, a)
    no_orphans(cloud, env, {a})


def green_of(cloud, env: str, release: str, proc: subprocess.Popen):
    """True once the run in ``proc`` holds the lock and has started its green instance."""
    fip = cloud.find_floating_ip(env)
    if fip is None or fip.state.lock is None or not fip.state.lock.holder.endswith(
            f":{proc.pid}"):
        return False
    return any(i.deploy_id == fip.state.lock.deploy_id
               for i in instances_of(cloud, env, release))


def test_ctrl_c_mid_deploy_cleans_up_and_exits_130(cloud, live):
    env, fip, a, b = live
    assert instances_of(cloud, env, b) == []
    proc = start_deploy(env, b)
    wait_until(lambda: green_of(cloud, env, b, proc), what="the green instance")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == Exit.INTERRUPTED, err
    assert "interrupted" in err
    assert instances_of(cloud, env, b) == []  # no cleanup needed
    assert cloud.find_floating_ip(env).state.lock is None
    serving(fip, a)


def test_kill_9_mid_deploy_then_locked_then_cleanup(cloud, live):
    env, fip, a, b = live
    assert instances_of(cloud, env, b) == []
    proc = start_deploy(env, b)
    wait_until(lambda: green_of(cloud, env, b, proc), what="the green instance")
    proc.kill()
    proc.communicate(timeout=60)
    serving(fip, a)
    again = run_rollout("deploy", "--env", env, "--release", b)
    assert again.rc == Exit.LOCKED, again
    assert "--break-lock" in again.json["error"] and "since" in again.json["error"]
    plain = run_rollout("cleanup", "--env", env)
    assert plain.rc == Exit.LOCKED
    res = run_rollout("cleanup", "--env", env, "--break-lock")
    assert res.rc == 0, res
    assert instances_of(cloud, env, b) == []
    serving(fip, a)
    no_orphans(cloud, env, {a})


def test_concurrent_deploy_fails_fast(cloud, live):
    env, fip, a, b = live
    first = start_deploy(env, b)
    wait_until(lambda: (f := cloud.find_floating_ip(env)) is not None and f.state.lock,
               what="the first deploy's lock")
    t0 = time.monotonic()
    second = run_rollout("deploy", "--env", env, "--release", b)
    assert second.rc == Exit.LOCKED, second
    assert time.monotonic() - t0 < 30
    assert "locked by" in second.json["error"]
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    serving(fip, b)
    back = run_rollout("rollback", "--env", env)  # restore A; B stays warm as previous
    assert back.rc == 0, back
    serving(fip, a)


def test_transient_cloud_errors_are_retried(cloud, live):
    env, fip, a, b = live
    fails = {"find_floating_ip": 2, "list_instances": 1}

    def flaky(name):
        def call(*args, **kw):
            if fails[name] > 0:
                fails[name] -= 1
                raise TransientCloudError(f"injected: LXD 503 on {name}")
            return getattr(cloud, name)(*args, **kw)
        return call

    rc, err = run_inproc(["rollback", "--env", env],  # to B (warm), then back to A
                         Wrapped(cloud, **{k: flaky(k) for k in fails}))
    assert rc == 0, err
    assert fails == {"find_floating_ip": 0, "list_instances": 0}
    serving(fip, b)
    assert run_rollout("rollback", "--env", env).rc == 0
    serving(fip, a)


def test_rollback_after_previous_was_deleted(cloud, live):
    env, fip, a, b = live
    assert cloud.find_floating_ip(env).state.previous == b
    for inst in instances_of(cloud, env, b):
        subprocess.run(["lxc", "delete", "-f", inst.name], check=True, capture_output=True)
    res = run_rollout("rollback", "--env", env)
    assert res.rc == Exit.PLAN, res
    assert "no healthy running instances" in res.json["error"]
    serving(fip, a)
    no_orphans(cloud, env, {a})


def test_nothing_to_roll_back_to_and_unknown_release(cloud, live, new_env):
    a = live[3]  # any release does: the fast one
    env = new_env("nr")
    res = run_rollout("rollback", "--env", env)
    assert res.rc == Exit.PLAN and "nothing was ever deployed" in res.json["error"]
    assert run_rollout("deploy", "--env", env, "--release", a).rc == 0
    res = run_rollout("rollback", "--env", env)
    assert res.rc == Exit.PLAN and "no previous release" in res.json["error"]
    res = run_rollout("deploy", "--env", env, "--release", "no-such-release")
    assert res.rc == Exit.PLAN and "make image RELEASE=no-such-release" in res.json["error"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-x", "-q"]))
