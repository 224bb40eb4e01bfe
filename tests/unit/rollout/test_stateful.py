"""A stateful model-based test of the deploy tool against the in-memory cloud (real HTTP).

Random sequences of deploy, rollback, cleanup and destroy; instances stopped, started or
deleted behind the tool's back; transient and permanent cloud errors injected; runs
cancelled by a signal at a random step, or killed (SIGKILL: no undo, no unlock). After every
step: the floating IP targets a front that passed the gate (or nothing, or an instance
removed behind the tool's back), no lock remains (but a killed run's, with its lease and
host:pid), one floating IP per env, cleanup never deleted a live or previous instance, and a
refused run changed nothing (I1, I3, I9, I11).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from dataclasses import replace

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from rollout import executor, health, lock
from rollout.clouds.base import RUNNING, STOPPED, Release
from rollout.context import Context
from rollout.errors import (
    Cancelled,
    CloudError,
    DeployLocked,
    HealthCheckFailed,
    PlanError,
    RolloutError,
    TransientCloudError,
)
from rollout.planner import DeployRequest, RollbackRequest
from tests.unit.rollout.fakecloud import FakeCloud, free_port

ENV = "dev"
RELEASES = [Release(f"img-{r}", f"modelserve-{r}", r, f"sha-{r}", acc, built_at=f"2026-01-0{n}",
                    provenance="release")
            for n, (r, acc) in enumerate([("a", 0.78), ("b", 0.79), ("c", 0.80), ("bad", 0.5)], 1)]
KINDS = ["delete_instances", "launch_front", "launch_workers", "health_gate", "switch",
         "verify", "retire"]
METHODS = ["list_releases", "list_instances", "find_floating_ip", "create_instance",
           "get_instance", "update_floating_ip", "delete_instance"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


DEAD_PID = _dead_pid()
FETCH_VERSION = health.fetch_version

fault = st.one_of(
    st.none(),
    st.tuples(st.just("transient"), st.sampled_from(METHODS), st.integers(1, 2)),
    st.tuples(st.just("permanent"), st.sampled_from(METHODS), st.just(1)),
    st.tuples(st.just("signal"), st.sampled_from(KINDS),
              st.sampled_from([signal.SIGINT, signal.SIGTERM, signal.SIGHUP])),
    # after the floating IP moved, before it was verified: a signal, or a failed check
    st.tuples(st.just("mid-switch"), st.sampled_from(["signal", "unhealthy"]),
              st.sampled_from([signal.SIGINT, signal.SIGTERM])),
)


class RolloutMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.cloud = FakeCloud(list(RELEASES), port=free_port())
        self.gated_ports: set[str] = set()  # fronts that passed a health gate
        self.behind_back: set[str] = set()  # ports of fronts we deleted behind the tool's back
        self.killed = False  # a SIGKILLed run's lock may remain
        orig = executor.Executor.do_health_gate
        gated = self.gated_ports

        def recording(ex, step):
            orig(ex, step)
            front = ex.by_name[step.front]
            if front.port:
                gated.add(front.port)
        self._orig_gate = orig
        executor.Executor.do_health_gate = recording

    def teardown(self):
        executor.Executor.do_health_gate = self._orig_gate
        self.cloud.close()

    # -- helpers ---------------------------------------------------------------------------
    def ctx(self, **kw) -> Context:
        return Context(cloud=self.cloud, env=ENV, sleep=lambda s: None, port=self.cloud.port,
                       probe=False, health_timeout=2, boot_timeout=2, **kw)

    def inject(self, f, ctx: Context) -> None:
        self.cloud.fail.clear()
        if f is None:
            return
        what, target, n = f
        if what == "transient":
            self.cloud.fail[target] = [TransientCloudError("503")] * n
        elif what == "permanent":
            self.cloud.fail[target] = [CloudError("permanent 400")]
        elif what == "mid-switch":
            def fetch(address, port=8080, how=target, sig=n):
                if how == "signal":
                    raise Cancelled(sig)
                raise HealthCheckFailed("the floating IP serves garbage")
            health.fetch_version = fetch
        else:
            def cancel(step, kind=target, sig=n):
                if step.kind == kind:
                    raise Cancelled(sig)
            ctx.before_step = cancel

    def run(self, fn, ctx) -> BaseException | None:
        fip = self.cloud.fips.get(ENV)
        before = (fip.revision if fip else None, len(self.cloud.floating_ips(ENV)),
                  set(self.cloud.instances))
        try:
            fn(ctx)
        except PlanError:
            fip = self.cloud.fips.get(ENV)
            after = (fip.revision if fip else None, len(self.cloud.floating_ips(ENV)),
                     set(self.cloud.instances))
            assert after == before, "I9: a refused run changed nothing"
        except DeployLocked:
            assert self.killed or self.cloud.fips[ENV].state.lock is None
        except (RolloutError, Cancelled) as exc:
            return exc
        finally:
            self.cloud.fail.clear()
            health.fetch_version = FETCH_VERSION
        return None

    # -- rules -----------------------------------------------------------------------------
    @rule(release=st.sampled_from(["a", "b", "c", "bad"]), workers=st.integers(0, 1), f=fault)
    def deploy(self, release, workers, f):
        ctx = self.ctx()
        self.inject(f, ctx)
        self.run(lambda c: executor.deploy(c, DeployRequest(ENV, c.deploy_id, release=release,
                                                            workers=workers)), ctx)

    @rule(f=fault)
    def rollback(self, f):
        ctx = self.ctx()
        self.inject(f, ctx)
        self.run(lambda c: executor.rollback(c, RollbackRequest(ENV, c.deploy_id)), ctx)

    @rule(break_lock=st.booleans())
    def cleanup(self, break_lock):
        ctx = self.ctx()
        observed = executor.observe(ctx)
        held = observed.fip.state.lock if observed.fip else None
        spared = observed.spared(held.deploy_id if held else "")
        refused = False
        try:
            executor.cleanup(ctx, keep=2, images=False, break_lock=break_lock)
        except PlanError:
            refused = True
        names = {i.name for i in self.cloud.instances.values()}
        assert spared <= names, f"I1: cleanup deleted {sorted(spared - names)}"
        if not refused:
            self.killed = False

    @rule()
    def destroy(self):
        executor.destroy(self.ctx(), break_lock=True)
        self.killed = False
        self.gated_ports.clear()

    @rule(release=st.sampled_from(["a", "b", "c"]), kill_at=st.sampled_from(KINDS[1:5]))
    def killed_run(self, release, kill_at):
        """SIGKILL at a step: no undo, no unlock; the lock holder's pid is gone."""
        if self.cloud.fips.get(ENV) and self.cloud.fips[ENV].state.lock:
            return
        ctx = self.ctx(holder=f"u@{socket.gethostname()}:{DEAD_PID}")

        def die(step):
            if step.kind == kill_at:
                raise SystemExit(137)
        ctx.before_step = die
        try:
            observed = executor.observe(ctx)
            plan = executor.plan_deploy(observed, DeployRequest(ENV, ctx.deploy_id,
                                                                release=release))
            lock._acquire(ctx, break_lock=False, create=True)
            observed = executor.observe(ctx)
            plan = executor.plan_deploy(observed, DeployRequest(ENV, ctx.deploy_id,
                                                                release=release))
        except (PlanError, DeployLocked):
            return
        self.killed = True
        ex = executor.Executor(ctx, observed, ctx.held, plan)
        ex.undo = lambda exc: None
        try:
            ex.apply()
        except SystemExit:
            pass

    @rule(data=st.data(), action=st.sampled_from(["stop", "start", "delete"]))
    def behind_the_back(self, data, action):
        insts = sorted(self.cloud.instances.values(), key=lambda i: i.name)
        if not insts:
            return
        inst = data.draw(st.sampled_from(insts))
        if action == "delete":
            self.behind_back.add(inst.port or "")
            self.cloud.delete_instance(inst.id)
        else:
            status = STOPPED if action == "stop" else RUNNING
            self.cloud.instances[inst.id] = replace(inst, status=status)
            if inst.id in self.cloud.apps:
                self.cloud.apps[inst.id].ready = action == "start"

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def one_floating_ip(self):
        assert len(self.cloud.floating_ips(ENV)) <= 1

    @invariant()
    def fip_targets_a_gated_front(self):
        fip = self.cloud.fips.get(ENV)
        if fip and fip.target:
            if fip.target in self.behind_back:
                return  # the operator deleted what it points at
            assert fip.target in self.gated_ports, f"I3: target never passed the gate: {fip}"
            assert any(i.port == fip.target for i in self.cloud.instances.values()), \
                f"I3: the tool deleted the instance the floating IP targets: {fip}"

    @invariant()
    def no_lock_but_a_killed_runs(self):
        fip = self.cloud.fips.get(ENV)
        lk = fip.state.lock if fip else None
        if lk is not None:
            assert self.killed, f"I3: a lock remains: {lk}"
            assert lk.expires and lk.pid == DEAD_PID and lk.host == socket.gethostname()


RolloutMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=12, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestRollout = RolloutMachine.TestCase
