"""The fault matrix on real LXD: every case ends with the live release serving, no orphans
after ``cleanup``, and the right exit status.

Faults are real (a release whose /readyz fails, a wrong model, SIGKILL, SIGINT and SIGTERM
of the rollout process, a concurrent deploy, deleted or stopped instances) or injected at the
Cloud boundary (a wrapper around the real LXDCloud whose chosen call fails).

Every case builds its own state: its own env and floating IP, with the stand-in release
``standin-a`` live (boots in seconds); stand-in releases are shared read-only. "Mid-deploy"
is the rollout tool's hook (MODELSERVE_ROLLOUT_PAUSE_BEFORE / _HOOK_DIR), never a poll. The
green side of the cases that test the tool's own undo paths is ``standin-b``; the
seed-credentials case uses release B, the real app when ROLLOUT_E2E_IMAGES=real.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest

from rollout import cli, executor
from rollout.clouds.base import BUILDING, CloudBase
from rollout.errors import CloudError, TransientCloudError
from rollout.health import fetch_version
from rollout.seed import parse_user_data
from tests.e2e.lxdenv import destroy_env, images_mode, new_env_name, run_rollout
from tests.e2e.standin import build_standin

pytestmark = pytest.mark.e2e
Exit = cli.ExitCode
LIVE, GREEN = "standin-a", "standin-b"


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


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def standins(cloud):
    """The stand-in releases of this module (shared read-only)."""
    build_standin(LIVE, accuracy=0.78)
    build_standin(GREEN, accuracy=0.80)
    return LIVE, GREEN


@pytest.fixture
def live(cloud, standins):
    """A fresh env of this case alone, with ``standin-a`` live; destroyed afterwards."""
    env = new_env_name("fx")
    try:
        res = run_rollout("deploy", "--env", env, "--release", LIVE)
        assert res.rc == 0, res
        yield SimpleNamespace(env=env, fip=res.json["floating_ip"], a=LIVE, b=GREEN)
    finally:
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
    env, fip, a = live.env, live.fip, live.a
    res = run_rollout("deploy", "--env", env, "--release", "standin-broken",
                      "--health-timeout", "15")
    assert res.rc == Exit.UNHEALTHY, res
    assert "did not become healthy" in res.json["error"] and "/readyz 503" in res.json["error"]
    assert instances_of(cloud, env, "standin-broken") == []  # removed without any cleanup
    serving(fip, a)
    no_orphans(cloud, env, {a})


def test_wrong_model_is_refused_at_once(cloud, live, broken_releases):
    env, fip, a = live.env, live.fip, live.a
    res = run_rollout("deploy", "--env", env, "--release", "standin-wrongsha")
    assert res.rc == Exit.UNHEALTHY, res
    assert "refusing to switch" in res.json["error"]
    assert instances_of(cloud, env, "standin-wrongsha") == []
    serving(fip, a)
    no_orphans(cloud, env, {a})


def test_worse_model_is_refused_without_force(cloud, live, broken_releases):
    env, fip, a = live.env, live.fip, live.a
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
    env, fip, a = live.env, live.fip, live.a
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
    env, fip, a, b = live.env, live.fip, live.a, live.b
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
    env, fip, a, b = live.env, live.fip, live.a, live.b

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
    env, fip, a, b = live.env, live.fip, live.a, live.b
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
    env, fip, a, b = live.env, live.fip, live.a, live.b

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


def _undone(cloud, env: str, fip: str, a: str, b: str) -> None:
    """After an interrupted deploy of b: a serves, no instance of b, no lock."""
    assert instances_of(cloud, env, b) == []  # no cleanup needed
    assert cloud.find_floating_ip(env).state.lock is None
    serving(fip, a)


def test_ctrl_c_mid_deploy_cleans_up_and_exits_130(cloud, live, background):
    env, fip, a, b = live.env, live.fip, live.a, live.b
    run = background("deploy", "--env", env, "--release", b, pause="health_gate")
    run.wait_paused()
    run.signal(signal.SIGINT)
    res = run.finish_after_signal()
    assert res.rc == Exit.INTERRUPTED, res
    assert "interrupted" in res.err
    _undone(cloud, env, fip, a, b)


def test_sigint_when_started_with_sigint_ignored(cloud, live, background):
    """CI shells start background jobs with SIGINT ignored: the deploy must still honour it."""
    env, fip, a, b = live.env, live.fip, live.a, live.b
    run = background("deploy", "--env", env, "--release", b, pause="health_gate",
                     sigint_ignored=True)
    run.wait_paused()
    run.signal(signal.SIGINT)
    res = run.finish_after_signal()
    assert res.rc == 130, res
    _undone(cloud, env, fip, a, b)
    assert run_rollout("cleanup", "--env", env).rc == 0


def test_sigterm_mid_gate_undoes_and_exits_143(cloud, live, background):
    env, fip, a, b = live.env, live.fip, live.a, live.b
    run = background("deploy", "--env", env, "--release", b, pause="health_gate")
    run.wait_paused()
    run.signal(signal.SIGTERM)
    res = run.finish_after_signal()
    assert res.rc == 143, res
    _undone(cloud, env, fip, a, b)


def test_kill_9_mid_gate_then_break_lock_then_a_normal_deploy(cloud, live, background):
    env, fip, a, b = live.env, live.fip, live.a, live.b
    run = background("deploy", "--env", env, "--release", b, pause="health_gate")
    run.wait_paused()
    dead_deploy = cloud.find_floating_ip(env).state.lock.deploy_id
    run.proc.kill()
    run.finish()
    serving(fip, a)
    assert instances_of(cloud, env, b), "the killed run's green instance should be left"
    plain = run_rollout("cleanup", "--env", env)
    assert plain.rc in (0, Exit.LOCKED), plain  # a provably dead holder may be taken over
    res = run_rollout("cleanup", "--env", env, "--break-lock")
    assert res.rc == 0, res
    assert not any(i.deploy_id == dead_deploy for i in cloud.list_instances(env))
    assert cloud.find_floating_ip(env).state.lock is None
    serving(fip, a)
    again = run_rollout("deploy", "--env", env, "--release", b)
    assert again.rc == 0, again
    serving(fip, b)


def test_concurrent_deploy_fails_fast(cloud, live, background):
    env, fip, b = live.env, live.fip, live.b
    first = background("deploy", "--env", env, "--release", b, pause="health_gate")
    first.wait_paused()  # it holds the lock now
    second = run_rollout("deploy", "--env", env, "--release", b)
    assert second.rc == Exit.LOCKED, second
    assert "locked by" in second.json["error"]
    first.go()
    res = first.finish()
    assert res.rc == 0, res
    serving(fip, b)


def test_two_deploys_racing_into_a_new_env_leave_one_floating_ip(cloud, standins, new_env,
                                                                 background):
    env = new_env("race")
    runs = [background("deploy", "--env", env, "--release", LIVE) for _ in range(2)]
    results = sorted(r.finish().rc for r in runs)
    assert results in ([0, 0], [0, Exit.LOCKED]), [r.result for r in runs]
    fwds = [f for f in cloud._forwards() if (f.get("config") or {}).get(  # noqa: SLF001
        "user.modelserve.env") == env]
    assert len(fwds) == 1, fwds
    fip = cloud.find_floating_ip(env)
    assert fip.state.lock is None
    serving(fip.address, LIVE)


def _warm_previous(env: str, fip: str, a: str, b: str) -> None:
    """b deployed then rolled back: a live, b warm as the recorded previous release."""
    assert run_rollout("deploy", "--env", env, "--release", b).rc == 0
    back = run_rollout("rollback", "--env", env)
    assert back.rc == 0, back
    serving(fip, a)


def test_transient_cloud_errors_are_retried(cloud, live):
    env, fip, a, b = live.env, live.fip, live.a, live.b
    _warm_previous(env, fip, a, b)
    fails = {"find_floating_ip": 2, "list_instances": 1}

    def flaky(name):
        def call(*args, **kw):
            if fails[name] > 0:
                fails[name] -= 1
                raise TransientCloudError(f"injected: LXD 503 on {name}")
            return getattr(cloud, name)(*args, **kw)
        return call

    rc, err = run_inproc(["rollback", "--env", env],  # to B (warm)
                         Wrapped(cloud, **{k: flaky(k) for k in fails}))
    assert rc == 0, err
    assert fails == {"find_floating_ip": 0, "list_instances": 0}
    serving(fip, b)


def test_rollback_after_previous_was_deleted(cloud, live):
    env, fip, a, b = live.env, live.fip, live.a, live.b
    _warm_previous(env, fip, a, b)
    assert cloud.find_floating_ip(env).state.previous == b
    for inst in instances_of(cloud, env, b):
        cloud.delete_instance(inst.id)
    res = run_rollout("rollback", "--env", env)
    assert res.rc == Exit.PLAN, res
    assert "no healthy running instances" in res.json["error"]
    serving(fip, a)
    no_orphans(cloud, env, {a})


def test_stopped_previous_release_survives_cleanup(cloud, live):
    """Issue 8: cleanup deleted the recorded previous release once it was stopped."""
    env, fip, a, b = live.env, live.fip, live.a, live.b
    _warm_previous(env, fip, a, b)
    for inst in instances_of(cloud, env, b):
        subprocess.run(["lxc", "stop", "--force", inst.name], check=True, capture_output=True)
    res = run_rollout("cleanup", "--env", env)
    assert res.rc == 0, res
    assert {i.status for i in instances_of(cloud, env, b)} == {"STOPPED"}
    assert cloud.find_floating_ip(env).state.previous == b
    serving(fip, a)


def test_stopped_live_front_survives_cleanup(cloud, live):
    """Issue 8: `lxc stop` the live front, then cleanup: it deleted the live release."""
    env, a = live.env, live.a
    (front,) = [i for i in instances_of(cloud, env, a) if i.role == "front"]
    subprocess.run(["lxc", "stop", "--force", front.name], check=True, capture_output=True)
    res = run_rollout("cleanup", "--env", env)
    assert res.rc == 0, res
    assert [i.status for i in instances_of(cloud, env, a)] == ["STOPPED"]
    st = run_rollout("status", "--env", env)
    assert st.rc == 0 and st.json["live"] == a, st
    # the floating IP still names the live front (an identity, not an address)
    assert cloud.find_floating_ip(env).target == front.name


def test_cleanup_refuses_when_the_target_is_no_visible_instance(cloud, live):
    env, a = live.env, live.a
    (front,) = [i for i in instances_of(cloud, env, a) if i.role == "front"]
    subprocess.run(["lxc", "delete", "--force", front.name], check=True, capture_output=True)
    res = run_rollout("cleanup", "--env", env)
    assert res.rc == Exit.PLAN, res
    assert cloud.find_floating_ip(env).target == front.name


def test_plan_with_nothing_live_skips_a_newer_low_accuracy_standin(cloud, standins, new_env,
                                                                  broken_releases):
    """Issue 8: with nothing live, `plan` (no --release) chose standin-worse (0.10)."""
    env = new_env("pl")
    res = run_rollout("plan", "--env", env)
    picked = (res.json or {}).get("release")
    assert picked not in ("standin-worse",), res
    assert not (picked or "").startswith("standin"), res  # stand-ins are never the default
    worse = run_rollout("plan", "--env", env, "--release", "standin-worse")
    assert worse.rc == Exit.PLAN, worse  # below its floor even with nothing live
    assert cloud.find_floating_ip(env) is None  # a refused plan allocates nothing


def test_a_new_container_never_gets_the_live_address(cloud, live):
    """I2: the live front's address is pinned; the forward targets its name."""
    env, a = live.env, live.a
    (front,) = [i for i in instances_of(cloud, env, a) if i.role == "front"]
    fwd = cloud.client.api.networks[cloud.bridge].forwards[live.fip].get().json()["metadata"]
    assert fwd["config"]["user.modelserve.target"] == front.name
    # only the app port is forwarded, to the pinned address: no default target
    assert "target_address" not in fwd["config"]
    assert [(p["protocol"], p["listen_port"], p["target_address"], p["target_port"])
            for p in fwd["ports"]] == [("tcp", "8080", front.address, "8080")]
    assert cloud._target_address(front.name) == front.address  # noqa: SLF001
    assert front.address not in {i.address for i in cloud.list_instances(None)
                                 if i.name != front.name}
    assert front.address in cloud.used_addresses()  # never picked for a new container


def test_nothing_to_roll_back_to_and_unknown_release(cloud, live, new_env):
    a = live.b  # any release does: the fast one
    env = new_env("nr")
    res = run_rollout("rollback", "--env", env)
    assert res.rc == Exit.PLAN, res
    assert any(t in res.json["error"] for t in ("nothing was ever deployed", "deploy first"))
    assert run_rollout("deploy", "--env", env, "--release", a).rc == 0
    res = run_rollout("rollback", "--env", env)
    assert res.rc == Exit.PLAN and "no previous release" in res.json["error"]
    res = run_rollout("deploy", "--env", env, "--release", "no-such-release")
    assert res.rc == Exit.PLAN and "make image RELEASE=no-such-release" in res.json["error"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-x", "-q"]))
