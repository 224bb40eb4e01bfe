"""Apply a plan to a cloud, with cleanup by construction.

``deploy``/``rollback``/``cleanup`` each: take the env lock (a CAS on the floating IP),
observe, plan (pure), apply, unlock. Everything a run creates is registered *before* the call
that creates it; on any failure — Ctrl-C included — the floating IP is put back if it moved and
was not verified, the run's instances are deleted, and whatever could not be deleted is named
in the error for ``cleanup``. The live release keeps serving throughout.
"""

from __future__ import annotations

import getpass
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from rollout import health
from rollout.clouds.base import (
    Cloud,
    Deployment,
    FipState,
    FloatingIP,
    HistoryEvent,
    Instance,
    InstanceSpec,
    Lock,
)
from rollout.errors import (
    CloudError,
    Conflict,
    DeployLocked,
    HealthCheckFailed,
    PlanError,
    RolloutError,
    WaitTimeout,
)
from rollout.planner import (
    CleanupRequest,
    CreateFloatingIP,
    DeleteImage,
    DeleteInstances,
    DeployRequest,
    HealthGate,
    LaunchFront,
    LaunchWorkers,
    Plan,
    Retire,
    RollbackRequest,
    Step,
    Switch,
    Verify,
    plan_cleanup,
    plan_deploy,
    plan_rollback,
)
from rollout.retry import CLOUD_CALL, HEALTH_GATE, ROLLBACK_HEALTH, VERIFY_SWITCH
from rollout.seed import Credentials, SeedParams, render_user_data


def utcnow() -> str:
    """ISO-8601 UTC, seconds."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_deploy_id() -> str:
    """A short random id naming one run (and its instances)."""
    return secrets.token_hex(3)


def default_holder() -> str:
    """user@host:pid — who holds a lock."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


class Reporter:
    """Progress lines on the console given (stderr); the executor never prints itself."""

    def __init__(self, console=None):
        self.console = console

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        """Spinner while a step runs, then a ✓/✗ line with its duration."""
        t0 = time.monotonic()
        if self.console is None:
            yield
            return
        try:
            with self.console.status(text):
                yield
        except BaseException:
            self.console.print(f"[red]✗[/] {text} [dim]({time.monotonic() - t0:.1f}s)[/]")
            raise
        self.console.print(f"[green]✓[/] {text} [dim]({time.monotonic() - t0:.1f}s)[/]")

    def info(self, text: str) -> None:
        """An informational line."""
        if self.console is not None:
            self.console.print(f"  {text}")

    def warn(self, text: str) -> None:
        """A warning line."""
        if self.console is not None:
            self.console.print(f"[yellow]![/] {text}")


@dataclass
class Context:
    """What every run needs; tests swap any part (sleep, timeouts, reporter, cloud)."""

    cloud: Cloud
    env: str
    reporter: Reporter = field(default_factory=Reporter)
    deploy_id: str = field(default_factory=new_deploy_id)
    holder: str = field(default_factory=default_holder)
    sleep: Callable[[float], None] = time.sleep
    boot_timeout: float = 180.0
    health_timeout: float = 240.0
    probe: bool = True
    worker_concurrency: int = 2
    flavor: str = ""
    port: int = 8080
    # test hook: called with each step before it runs (fault injection at the step boundary)
    before_step: Callable[[Step], None] | None = None


def cloud_call(ctx: Context, fn, what: str):
    """One cloud call under the CLOUD_CALL policy (transient errors retried)."""
    return CLOUD_CALL.run(fn, sleep=ctx.sleep, what=what)


def observe(ctx: Context) -> Deployment:
    """Read the env's floating IP, all releases and the env's instances."""
    fip = cloud_call(ctx, lambda: ctx.cloud.find_floating_ip(ctx.env), "reading floating IP")
    releases = cloud_call(ctx, ctx.cloud.list_releases, "listing releases")
    insts = cloud_call(ctx, lambda: ctx.cloud.list_instances(ctx.env), "listing instances")
    return Deployment(ctx.env, fip, tuple(releases), tuple(insts))


# -- the lock --------------------------------------------------------------------------------
@contextmanager
def env_lock(ctx: Context, *, break_lock: bool = False, create: bool = True
             ) -> Iterator[Lock]:
    """Hold the env's deploy lock (on its floating IP) for the block."""
    cloud = ctx.cloud
    fip = cloud_call(ctx, lambda: cloud.find_floating_ip(ctx.env), "reading floating IP")
    if fip is None:
        if not create:
            raise PlanError(f"env {ctx.env} has no floating IP: nothing was ever deployed")
        with ctx.reporter.step(f"allocate the floating IP of env {ctx.env}"):
            try:
                fip = cloud_call(ctx, lambda: cloud.create_floating_ip(ctx.env),
                                 "creating floating IP")
            except Conflict:
                fip = cloud.find_floating_ip(ctx.env)
        if fip is None:
            raise CloudError(f"could not allocate the floating IP of env {ctx.env}")
    mine = Lock(ctx.holder, utcnow(), ctx.deploy_id)
    for _attempt in range(10):
        held = fip.state.lock
        if held and held.deploy_id != ctx.deploy_id and not break_lock:
            raise DeployLocked(ctx.env, held.holder, held.since, held.deploy_id)
        if held and break_lock and held.deploy_id != ctx.deploy_id:
            ctx.reporter.warn(f"breaking the lock of {held.holder} (deploy {held.deploy_id}, "
                              f"since {held.since})")
        try:
            fip = cloud_call(ctx, lambda f=fip: cloud.update_floating_ip(
                f, target=f.target, state=replace(f.state, lock=mine),
                if_revision=f.revision), "taking the deploy lock")
            break
        except Conflict:
            ctx.sleep(0.2)
            fip = cloud_call(ctx, lambda: cloud.find_floating_ip(ctx.env), "reading FIP")
            if fip is None:
                raise CloudError(f"the floating IP of env {ctx.env} vanished") from None
    else:
        raise RolloutError(f"could not take the lock of env {ctx.env}: it keeps changing; "
                           "retry")
    try:
        yield mine
    finally:
        _unlock(ctx, mine)


def _unlock(ctx: Context, mine: Lock) -> None:
    with _no_interrupts():
        for _attempt in range(10):
            fip = ctx.cloud.find_floating_ip(ctx.env)
            if fip is None or not fip.state.lock or fip.state.lock.deploy_id != mine.deploy_id:
                return
            try:
                cloud_call(ctx, lambda f=fip: ctx.cloud.update_floating_ip(
                    f, target=f.target, state=replace(f.state, lock=None),
                    if_revision=f.revision), "releasing the deploy lock")
                return
            except Conflict:
                ctx.sleep(0.2)
        ctx.reporter.warn(f"could not release the lock of env {ctx.env}; "
                          f"python -m rollout cleanup --env {ctx.env} --break-lock")


@contextmanager
def _no_interrupts() -> Iterator[None]:
    """Ignore Ctrl-C while undoing (main thread only); a second Ctrl-C must not orphan."""
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


# -- the executor ----------------------------------------------------------------------------
class Executor:
    """Applies one plan's steps, undoing this run's changes if any step fails."""

    def __init__(self, ctx: Context, observed: Deployment, lock: Lock | None, plan: Plan):
        self.ctx, self.observed, self.lock, self.plan = ctx, observed, lock, plan
        self.by_name: dict[str, Instance] = {i.name: i for i in observed.instances}
        self.created: list[str] = []
        self.switched_from: FloatingIP | None = None  # FIP as it was before our switch
        self.verified = False
        self.leftovers: list[str] = []
        self.timings: dict[str, float] = {}
        self.probe_result: health.ProbeResult | None = None
        self.credentials = Credentials.generate()
        self.result: dict = {}
        self.started = time.monotonic()

    # each handler takes its step
    def apply(self) -> dict:
        """Run every step; undo on failure; return the JSON-ready result."""
        try:
            for step in self.plan.steps:
                if self.ctx.before_step:
                    self.ctx.before_step(step)
                t0 = time.monotonic()
                with self.ctx.reporter.step(step.describe()):
                    getattr(self, f"do_{step.kind}")(step)
                self.timings[step.kind] = round(
                    self.timings.get(step.kind, 0) + time.monotonic() - t0, 3)
        except BaseException as exc:
            self.undo(exc)
            raise
        return self.summary()

    def summary(self) -> dict:
        """What happened, for --json and the closing line."""
        fip = self.ctx.cloud.find_floating_ip(self.ctx.env)
        return {
            "action": self.plan.action,
            "env": self.ctx.env,
            "release": self.plan.release,
            "from_release": self.observed.live,
            "deploy_id": self.ctx.deploy_id,
            "floating_ip": fip.address if fip else None,
            "url": health.base_url(fip.address, self.ctx.port) + "/" if fip else None,
            "steps": [s.to_dict() for s in self.plan.steps],
            "notes": list(self.plan.notes),
            "timings": self.timings,
            "seconds": round(time.monotonic() - self.started, 3),
            "switch_to_traffic_s": self.result.get("switch_to_traffic_s"),
            "probe": self.probe_result.to_dict() if self.probe_result else None,
            "leftovers": self.leftovers,
        }

    # -- undo ----------------------------------------------------------------------------
    def undo(self, exc: BaseException) -> None:
        """Put the floating IP back (if moved, unverified) and delete what this run made.

        Once the switch is verified the new release is live and healthy: it is the truth now,
        and nothing it runs on is deleted (a later failure, e.g. retiring, is only reported).
        """
        ctx = self.ctx
        if self.verified:
            ctx.reporter.warn(f"{self.plan.release} is live and verified; a later step failed")
            return
        with _no_interrupts():
            if self.switched_from is not None and not self.verified:
                old = self.switched_from
                try:
                    cur = ctx.cloud.find_floating_ip(ctx.env)
                    if cur is not None:
                        cloud_call(ctx, lambda: ctx.cloud.update_floating_ip(
                            cur, target=old.target, state=replace(old.state, lock=self.lock),
                            if_revision=cur.revision), "switching the floating IP back")
                        ctx.reporter.warn(f"floating IP switched back to {old.target}")
                except Exception as err:  # noqa: BLE001 - report, keep undoing
                    ctx.reporter.warn(f"could not switch the floating IP back: {err}")
                    self.leftovers.append(f"floating-ip:{ctx.env}")
            for name in reversed(self.created):
                inst = self.by_name.get(name)
                inst_id = inst.id if inst else name
                try:
                    cloud_call(ctx, lambda i=inst_id: ctx.cloud.delete_instance(i),
                               f"deleting {name}")
                    ctx.reporter.info(f"deleted {name} (created by this run)")
                except Exception as err:  # noqa: BLE001
                    ctx.reporter.warn(f"could not delete {name}: {err}")
                    self.leftovers.append(name)
        if self.leftovers and isinstance(exc, RolloutError):
            exc.args = (f"{exc.args[0] if exc.args else exc}; left behind: "
                        f"{', '.join(self.leftovers)} — python -m rollout cleanup --env "
                        f"{ctx.env}",)

    # -- step handlers ---------------------------------------------------------------------
    def do_create_floating_ip(self, step: CreateFloatingIP) -> None:
        """Normally done while taking the lock; kept for plans made without one."""
        if self.ctx.cloud.find_floating_ip(step.env) is None:
            self.ctx.cloud.create_floating_ip(step.env)

    def do_delete_instances(self, step: DeleteInstances) -> None:
        for name in step.instances:
            inst = self.by_name.get(name)
            cloud_call(self.ctx, lambda i=(inst.id if inst else name): self.ctx.cloud
                       .delete_instance(i), f"deleting {name}")

    def do_retire(self, step: Retire) -> None:
        try:
            self.do_delete_instances(DeleteInstances(step.instances, "retired"))
        except (RolloutError, OSError) as err:
            self.ctx.reporter.warn(f"retiring {step.release} failed: {err}")
            self.leftovers.extend(step.instances)

    def do_delete_image(self, step: DeleteImage) -> None:
        rel = self.observed.release(step.release)
        if rel is not None:
            cloud_call(self.ctx, lambda: self.ctx.cloud.delete_release(rel),
                       f"deleting image {step.image}")

    def _launch(self, name: str, release: str, params: SeedParams, role: str) -> Instance:
        ctx = self.ctx
        rel = self.observed.release(release)
        if rel is None:
            raise PlanError(f"image of release {release} vanished")
        labels = {"env": ctx.env, "release": release, "colour": params.colour, "role": role,
                  "deploy_id": ctx.deploy_id, "created_at": utcnow(),
                  "model_sha256": rel.model_sha256}
        spec = InstanceSpec(name, rel, labels, render_user_data(params), ctx.flavor)
        self.created.append(name)  # registered before the call: Ctrl-C mid-create cleans too
        inst = cloud_call(ctx, lambda: ctx.cloud.create_instance(spec), f"creating {name}")
        self.by_name[name] = inst
        inst = ctx.cloud.wait_for_instance(inst.id, timeout=ctx.boot_timeout)
        self.by_name[name] = inst
        ctx.reporter.info(f"{name} is up at {inst.address}")
        return inst

    def _seed(self, role: str, release: str, colour: str, **kw) -> SeedParams:
        return SeedParams(role=role, colour=colour, release=release,
                          deploy_id=self.ctx.deploy_id, env=self.ctx.env,
                          credentials=self.credentials, port=self.ctx.port,
                          worker_concurrency=self.ctx.worker_concurrency, **kw)

    def do_launch_front(self, step: LaunchFront) -> None:
        self._launch(step.name, step.release,
                     self._seed("front", step.release, step.colour,
                                broker_bind=step.broker_bind), "front")

    def do_launch_workers(self, step: LaunchWorkers) -> None:
        front = self.by_name[step.front]
        for name in step.names:
            self._launch(name, step.release,
                         self._seed("worker", step.release, step.colour,
                                    broker_host=front.address), "worker")

    def do_health_gate(self, step: HealthGate) -> None:
        ctx = self.ctx
        front = self.by_name[step.front]
        if not front.address:
            front = ctx.cloud.get_instance(front.id)
        fresh = step.front in self.created
        policy = HEALTH_GATE.with_budget(ctx.health_timeout) if fresh else ROLLBACK_HEALTH
        deploy_id = front.deploy_id

        def attempt() -> dict:
            return health.check_front(front.address or "", release=step.release,
                                      model_sha256=step.model_sha256, deploy_id=deploy_id,
                                      name=front.name, port=ctx.port)

        try:
            version = policy.run(attempt, sleep=ctx.sleep, what=f"health gate of {front.name}")
        except WaitTimeout as exc:
            raise HealthCheckFailed(
                f"{front.name} ({step.release}) did not become healthy: {exc}; the live "
                "release keeps serving") from exc
        if version.get("colour") and version["colour"] != front.colour:
            raise HealthCheckFailed(f"{front.name} says colour {version['colour']}, "
                                    f"expected {front.colour}: its seed did not apply")
        for name in step.workers:
            w = self.by_name[name]
            if w.status != "RUNNING":
                raise HealthCheckFailed(f"worker {name} is {w.status}")

    def do_switch(self, step: Switch) -> None:
        ctx = self.ctx
        front = self.by_name[step.front]
        fip = cloud_call(ctx, lambda: ctx.cloud.find_floating_ip(ctx.env), "reading FIP")
        if fip is None:
            raise CloudError(f"the floating IP of env {ctx.env} vanished")
        if self.lock and (not fip.state.lock or fip.state.lock.deploy_id != self.lock.deploy_id):
            raise DeployLocked(ctx.env, *(
                (fip.state.lock.holder, fip.state.lock.since, fip.state.lock.deploy_id)
                if fip.state.lock else ("nobody (our lock was broken)", "-", "-")))
        probe = None
        if ctx.probe and fip.target:
            probe = health.Probe(fip.address, port=ctx.port).start()
            ctx.sleep(0.15)  # let the probe see the old release first
        state = FipState(live=step.release, previous=step.previous or "", lock=self.lock)
        self.switched_from = fip
        t0 = time.monotonic()
        try:
            cloud_call(ctx, lambda: ctx.cloud.update_floating_ip(
                fip, target=front.port, state=state, if_revision=fip.revision),
                "switching the floating IP")
            self._verify(step.release, fip.address, t0)
        finally:
            if probe is not None:
                ctx.sleep(0.15)  # and the new one after
                self.probe_result = probe.stop()
                res = self.probe_result
                line = (f"probe: {res.failed} failed of {res.total} requests during the "
                        f"switch ({dict(res.by_release)})")
                (ctx.reporter.warn if res.failed else ctx.reporter.info)(
                    line + (f" errors: {dict(res.errors)}" if res.failed else ""))
        try:
            cur = ctx.cloud.find_floating_ip(ctx.env)
            if cur is not None:
                ctx.cloud.record_event(cur, HistoryEvent(
                    utcnow(), self.plan.action, step.release, step.from_release or "",
                    ctx.deploy_id))
        except RolloutError as err:
            ctx.reporter.warn(f"could not record history: {err}")

    def _verify(self, release: str, address: str, t0: float) -> None:
        def seen() -> dict:
            v = health.fetch_version(address, self.ctx.port)
            if v.get("release") != release:
                raise health.NotReady(f"floating IP still serves {v.get('release')}")
            return v

        try:
            VERIFY_SWITCH.run(seen, sleep=self.ctx.sleep, what=f"/version via {address}")
        except WaitTimeout as exc:
            raise HealthCheckFailed(f"after the switch the floating IP did not serve {release}: "
                                    f"{exc}") from exc
        self.result["switch_to_traffic_s"] = round(time.monotonic() - t0, 3)
        self.verified = True
        self.ctx.reporter.info(f"{address} serves {release} "
                               f"({self.result['switch_to_traffic_s']}s after the switch)")

    def do_verify(self, step: Verify) -> None:
        if not self.verified:  # the switch verifies itself; this covers a re-run plan
            fip = self.ctx.cloud.find_floating_ip(self.ctx.env)
            if fip is None:
                raise CloudError(f"the floating IP of env {self.ctx.env} vanished")
            self._verify(step.release, fip.address, time.monotonic())


# -- the commands ----------------------------------------------------------------------------
def deploy(ctx: Context, req: DeployRequest) -> dict:
    """Lock, observe, plan, apply."""
    with env_lock(ctx) as lock:
        observed = observe(ctx)
        plan = plan_deploy(observed, req)
        for note in plan.notes:
            ctx.reporter.info(note)
        return Executor(ctx, observed, lock, plan).apply()


def rollback(ctx: Context, req: RollbackRequest) -> dict:
    """Lock, observe, plan, apply (no instance is created)."""
    with env_lock(ctx, create=False) as lock:
        observed = observe(ctx)
        plan = plan_rollback(observed, req)
        return Executor(ctx, observed, lock, plan).apply()


def cleanup(ctx: Context, *, keep: int, images: bool, break_lock: bool) -> dict:
    """Lock (breaking a stale one if asked), observe, plan_cleanup, apply."""
    fip = ctx.cloud.find_floating_ip(ctx.env)
    if fip is None:
        # never deployed (or FIP gone): only orphans can exist; no lock to take
        observed = observe(ctx)
        plan = plan_cleanup(observed, CleanupRequest(ctx.env, keep, images, _elsewhere(ctx)))
        return Executor(ctx, observed, None, plan).apply()
    with env_lock(ctx, break_lock=break_lock, create=False) as lock:
        observed = observe(ctx)
        plan = plan_cleanup(observed, CleanupRequest(ctx.env, keep, images, _elsewhere(ctx)))
        return Executor(ctx, observed, lock, plan).apply()


def _elsewhere(ctx: Context) -> frozenset[str]:
    every = cloud_call(ctx, lambda: ctx.cloud.list_instances(None), "listing all instances")
    return frozenset(i.release for i in every if i.env != ctx.env)


def plan_only(ctx: Context, req: DeployRequest) -> dict:
    """Dry run: the plan, nothing changed (no lock taken)."""
    plan = plan_deploy(observe(ctx), req)
    return plan.to_dict()


def status(ctx: Context) -> dict:
    """Live release, rollback target, lock, floating IP, instances and images of the env."""
    observed = observe(ctx)
    fip = observed.fip
    live = observed.live_instance
    return {
        "env": ctx.env,
        "cloud": ctx.cloud.name,
        "floating_ip": fip.address if fip else None,
        "url": health.base_url(fip.address, ctx.port) + "/" if fip else None,
        "target": fip.target if fip else None,
        "live": observed.live,
        "live_colour": live.colour if live else None,
        "previous": observed.previous,
        "lock": (None if not fip or not fip.state.lock else
                 {"holder": fip.state.lock.holder, "since": fip.state.lock.since,
                  "deploy_id": fip.state.lock.deploy_id}),
        "instances": [
            {"name": i.name, "release": i.release, "colour": i.colour, "role": i.role,
             "status": i.status, "address": i.address, "deploy_id": i.deploy_id,
             "live": bool(live and i.deploy_id == live.deploy_id and i.release == live.release)}
            for i in observed.instances
        ],
        "releases": [
            {"release": r.release, "image": r.name, "built_at": r.built_at,
             "model_sha256": r.model_sha256, "model_accuracy": r.model_accuracy,
             "git_sha": r.git_sha}
            for r in observed.releases
        ],
    }


def history(ctx: Context) -> list[dict]:
    """The env's switch history, oldest first."""
    fip = cloud_call(ctx, lambda: ctx.cloud.find_floating_ip(ctx.env), "reading floating IP")
    if fip is None:
        return []
    return [{"at": e.at, "action": e.action, "release": e.release,
             "from_release": e.from_release or None, "deploy_id": e.deploy_id}
            for e in fip.history]


def destroy(ctx: Context, *, break_lock: bool = False) -> dict:
    """Delete every instance of the env and its floating IP (the env is gone afterwards)."""
    names: list[str] = []
    fip = cloud_call(ctx, lambda: ctx.cloud.find_floating_ip(ctx.env), "reading floating IP")
    if fip is not None and fip.state.lock and not break_lock:
        lk = fip.state.lock
        raise DeployLocked(ctx.env, lk.holder, lk.since, lk.deploy_id)
    for inst in cloud_call(ctx, lambda: ctx.cloud.list_instances(ctx.env), "listing instances"):
        with ctx.reporter.step(f"delete {inst.name} ({inst.release}, {inst.role})"):
            cloud_call(ctx, lambda i=inst.id: ctx.cloud.delete_instance(i), f"deleting {inst.name}")
        names.append(inst.name)
    if fip is not None:
        with ctx.reporter.step(f"release floating IP {fip.address}"):
            cloud_call(ctx, lambda: ctx.cloud.delete_floating_ip(fip), "deleting floating IP")
    return {"action": "destroy", "env": ctx.env, "deleted": names,
            "floating_ip": fip.address if fip else None}
