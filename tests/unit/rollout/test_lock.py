"""The env lock (invariants I3, I11): a lease with the holder's identity, takeover only of a
provably dead or expired holder, ``cleanup --break-lock`` removing (and first naming) a dead
run's instances, and race-free creation of an env's floating IP + lock."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from rich.console import Console

from rollout import executor, lock
from rollout.bounded import BoundedCloud
from rollout.clouds.base import Lock, Release
from rollout.context import Context, parse_utc, utcnow
from rollout.errors import DeployLocked
from rollout.planner import DeployRequest, Step
from rollout.report import Reporter
from tests.unit.rollout._cli_driver import releases
from tests.unit.rollout.fakecloud import FakeCloud, free_port

ENV = "dev"


@pytest.fixture
def cloud():
    c = FakeCloud(releases(), port=free_port())
    yield c
    c.close()


def ctx_for(cloud, console=None, **kw) -> Context:
    return Context(cloud=cloud, env=ENV, sleep=lambda s: None, port=cloud.port,
                   reporter=Reporter(console), **kw)


def deploy(cloud, release, **kw):
    ctx = ctx_for(cloud, **kw)
    return executor.deploy(ctx, DeployRequest(ENV, ctx.deploy_id, release=release))


def set_lock(cloud, lk):
    fip = cloud.fips[ENV]
    cloud.fips[ENV] = replace(fip, state=replace(fip.state, lock=lk))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def console():
    buf = io.StringIO()
    return buf, Console(file=buf, width=300, highlight=False)


def test_the_lock_names_host_pid_and_a_lease_that_renewal_extends(cloud):
    ctx = ctx_for(cloud, lease_s=60)
    with lock.env_lock(ctx) as mine:
        held = cloud.fips[ENV].state.lock
        assert held == mine and held.host == socket.gethostname() and held.pid == os.getpid()
        first = parse_utc(held.expires)
        assert first > parse_utc(held.since)
        ctx.lease_s = 3600
        lock.renew(ctx)
        assert parse_utc(cloud.fips[ENV].state.lock.expires) > first
    assert cloud.fips[ENV].state.lock is None


def test_renewal_notices_a_lock_taken_over(cloud):
    ctx = ctx_for(cloud)
    with pytest.raises(DeployLocked, match="other"):
        with lock.env_lock(ctx):
            set_lock(cloud, Lock("x@elsewhere:1", utcnow(), "other", utcnow(600)))
            lock.renew(ctx)


def test_sigkilled_run_leaves_its_lock_with_lease_and_host_pid(cloud):
    """SIGKILL runs no code: what the lock says is what ``_acquire`` wrote."""
    ctx = ctx_for(cloud)
    lock._acquire(ctx, break_lock=False, create=True)  # and then the process is killed
    lk = cloud.fips[ENV].state.lock
    assert lk.deploy_id == ctx.deploy_id and lk.expires and lk.host == socket.gethostname()
    assert parse_utc(lk.expires) > datetime.now(timezone.utc)


@pytest.mark.parametrize("holder_kind", ["dead-pid-here", "expired-elsewhere"])
def test_a_dead_or_expired_holder_is_taken_over_with_a_warning(cloud, holder_kind):
    deploy(cloud, "a")
    if holder_kind == "dead-pid-here":
        lk = Lock(f"u@{socket.gethostname()}:{dead_pid()}", utcnow(), "dead01", utcnow(600))
    else:
        lk = Lock("u@elsewhere:1", utcnow(-7200), "dead01", utcnow(-3600))
    set_lock(cloud, lk)
    buf, con = console()
    deploy(cloud, "b", console=con)
    assert "taking over the lock" in buf.getvalue() and "dead01" in buf.getvalue()
    assert cloud.fips[ENV].state.lock is None


@pytest.mark.parametrize("break_lock", [False, True])
def test_a_live_holder_is_never_broken(cloud, break_lock):
    deploy(cloud, "a")
    # this very process, lease long expired: still alive, so never broken
    lk = Lock(f"u@{socket.gethostname()}:{os.getpid()}", utcnow(-7200), "live01", utcnow(-3600))
    set_lock(cloud, lk)
    with pytest.raises(DeployLocked):
        executor.cleanup(ctx_for(cloud), keep=2, images=False, break_lock=break_lock)
    assert cloud.fips[ENV].state.lock == lk


def test_an_unexpired_holder_elsewhere_needs_break_lock(cloud):
    deploy(cloud, "a")
    set_lock(cloud, Lock("u@elsewhere:1", utcnow(), "other1", utcnow(600)))
    with pytest.raises(DeployLocked):
        deploy(cloud, "b")
    executor.cleanup(ctx_for(cloud), keep=2, images=False, break_lock=True)
    assert cloud.fips[ENV].state.lock is None


def _dead_run(cloud, release: str, kill_at: str) -> str:
    """A run that takes the lock, launches, and is SIGKILLed at ``kill_at`` (no undo, no
    unlock); returns its deploy id. Its holder is a pid that no longer exists."""
    ctx = ctx_for(cloud, holder=f"u@{socket.gethostname()}:{dead_pid()}")

    def die(step: Step):
        if step.kind == kill_at:
            raise SystemExit(137)
    ctx.before_step = die
    lock._acquire(ctx, break_lock=False, create=True)
    observed = executor.observe(ctx)
    plan = executor.plan_deploy(observed, DeployRequest(ENV, ctx.deploy_id, release=release))
    ex = executor.Executor(ctx, observed, ctx.held, plan)
    ex.undo = lambda exc: None
    with pytest.raises(SystemExit):
        ex.apply()
    return ctx.deploy_id


def test_break_lock_names_then_deletes_the_dead_runs_instances_never_live(cloud):
    deploy(cloud, "a")
    deploy(cloud, "b")
    before = set(cloud.instances)
    cloud.releases.append(Release("img-c", "modelserve-c", "c", "sha-c", 0.78,
                                  built_at="2025-12-01", provenance="release"))
    dead = _dead_run(cloud, "c", "health_gate")  # a complete, running, warm-looking set
    assert len(cloud.instances) == len(before) + 1 and cloud.fips[ENV].state.lock
    buf, con = console()
    executor.cleanup(ctx_for(cloud, console=con), keep=2, images=False, break_lock=True)
    out = buf.getvalue()
    assert set(cloud.instances) == before and cloud.fips[ENV].state.lock is None
    will = out.index("will delete")
    assert dead in out[will:] and will < out.index("✓ delete")
    # and a normal deploy afterwards launches a fresh set
    res = deploy(cloud, "c")
    assert res["release"] == "c" and "launch_front" in [st["kind"] for st in res["steps"]]


def test_cleanup_and_destroy_without_a_floating_ip_take_the_lock(cloud):
    ctx = ctx_for(cloud)
    dead = _dead_run(cloud, "a", "health_gate")
    fip = cloud.fips.pop(ENV)  # the env's floating IP is gone, an orphan remains
    srv = cloud.fip_servers.pop(ENV)
    srv.shutdown()
    srv.server_close()
    assert fip and any(i.deploy_id == dead for i in cloud.instances.values())
    seen = []
    orig = cloud.update_floating_ip

    def update(f, **kw):
        seen.append(kw["state"].lock)
        return orig(f, **kw)
    cloud.update_floating_ip = update
    executor.cleanup(ctx, keep=2, images=False, break_lock=False)
    assert not cloud.instances and ENV not in cloud.fips  # the lock's FIP is given back
    assert seen and seen[0].deploy_id == ctx.deploy_id
    executor.destroy(ctx_for(cloud))
    assert cloud.floating_ips(ENV) == []


def test_two_runs_racing_into_a_new_env_one_wins_one_floating_ip(cloud):
    orig_find = cloud.find_floating_ip
    for trial in range(50):
        _race(cloud, f"race{trial}", orig_find)


def _race(cloud, env, orig_find):
    start = threading.Barrier(2, timeout=10)
    first = threading.local()

    def find(e):  # both runs see "no floating IP" before either creates one
        if not getattr(first, "done", False):
            first.done = True
            out = orig_find(e)
            start.wait()
            return out
        return orig_find(e)
    cloud.find_floating_ip = find
    outcome: dict[int, str] = {}
    done = [threading.Event(), threading.Event()]

    def racer(n: int) -> None:
        ctx = Context(cloud=cloud, env=env, sleep=lambda s: None)
        try:
            with lock.env_lock(ctx):
                outcome[n] = "won"
                done[1 - n].wait(10)  # hold the lock until the other has finished
        except DeployLocked:
            outcome[n] = "locked"
        except BaseException as exc:  # noqa: BLE001
            outcome[n] = repr(exc)
        finally:
            done[n].set()

    threads = [threading.Thread(target=racer, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcome.values()) == ["locked", "won"], (env, outcome)
    fips = cloud.floating_ips(env)
    assert len(fips) == 1 and fips[0].state.lock is None


def test_the_context_only_holds_a_bounded_cloud(cloud):
    ctx = ctx_for(cloud)
    assert isinstance(ctx.cloud, BoundedCloud) and ctx.cloud.unwraps(cloud)
    assert not hasattr(ctx.cloud, "fips") and not hasattr(ctx.cloud, "_cloud")


def test_expiry_is_in_the_future_by_the_lease():
    assert parse_utc(utcnow(3600)) - parse_utc(utcnow()) >= timedelta(seconds=3599)
