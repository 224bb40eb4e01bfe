"""Apply a plan to a cloud, with cleanup by construction.

``deploy``/``rollback``/``cleanup`` each: observe and plan WITHOUT the lock (a refusal
changes nothing: invariant I9), then take the env lock (``lock.py``: a leased CAS on the
floating IP, creating it race-free for a new env), observe and plan again, apply, unlock.
(A rollback nobody is in the way of skips the lock: its switch is one compare-and-swap from
the observed revision, which loses if anything changed since; then it runs the locked way.)
Everything a run creates is registered *before* the call that creates it; on any failure
(a signal included: ``cancel.py``) the floating IP is put back if it moved, was not verified
and still carries our lock, the run's instances are deleted, and whatever could not be
deleted is named in the error for ``cleanup``; errors met while undoing are reported beside
the first one. The live release keeps serving throughout. The cloud is only reached through
``ctx.cloud``, a ``BoundedCloud`` (every call under a named retry policy: I6).

Module map: ``context.py`` (Context, ids, test hook) · ``lock.py`` · ``report.py`` (Reporter)
· ``views.py`` (observe, status, history, destroy) · ``bounded.py`` · ``cancel.py``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from datetime import datetime, timezone

from rollout import analysis, cancel, diff, health, tls
from rollout.clouds.base import (
    Deployment,
    FipState,
    FloatingIP,
    HistoryEvent,
    Instance,
    InstanceSpec,
    Lock,
    Preview,
    preview_env,
)
from rollout.context import (  # noqa: F401 - re-exported
    Context,
    default_holder,
    new_deploy_id,
    parse_utc,
    pause_hook,
    utcnow,
)
from rollout.errors import (
    AnalysisFailed,
    CloudError,
    Conflict,
    DeployLocked,
    DiffRefused,
    HealthCheckFailed,
    PlanError,
    RolloutError,
    StaleObservation,
    WaitTimeout,
    add_also,
    also_text,
)
from rollout.lock import env_lock, renew  # noqa: F401 - re-exported
from rollout.planner import (
    AbortRequest,
    CleanupRequest,
    CreateFloatingIP,
    DeleteImage,
    DeleteInstances,
    DeployRequest,
    DiffGate,
    EndPreview,
    HealthGate,
    LaunchFront,
    LaunchWorkers,
    Plan,
    PromoteRequest,
    Retire,
    RollbackRequest,
    StartPreview,
    Switch,
    Verify,
    check_spared,
    plan_abort,
    plan_cleanup,
    plan_deploy,
    plan_promote,
    plan_rollback,
)
from rollout.report import Reporter  # noqa: F401 - re-exported
from rollout.retry import HEALTH_GATE, ROLLBACK_HEALTH, VERIFY_SWITCH
from rollout.seed import Credentials, SeedParams, render_user_data
from rollout.views import destroy, history, observe, status  # noqa: F401 - re-exported


# -- the executor ----------------------------------------------------------------------------
class Executor:
    """Applies one plan's steps, undoing this run's changes if any step fails."""

    def __init__(self, ctx: Context, observed: Deployment, lock: Lock | None, plan: Plan, *,
                 cas: bool = False):
        self.ctx, self.observed, self.lock, self.plan = ctx, observed, lock, plan
        # cas: no lock; the switch is one compare-and-swap from the observed revision
        # (``rollback``), which any change since the observation makes lose
        self.cas = cas
        self.by_name: dict[str, Instance] = {i.name: i for i in observed.instances}
        self.created: list[str] = []
        self.switched_from: FloatingIP | None = None  # FIP as it was before our switch
        self.switched_to: str | None = None  # the port our switch pointed it at
        self.preview_aimed = False  # this run aimed the preview address (undo clears it)
        self.preview_lent: str | None = None  # promote: the port the preview address let go
        self.verified = False
        # committed: the new release is the truth (verified, and its analysis passed or
        # there is nothing to roll back to); before that, undo switches back
        self.committed = False
        self.baseline: analysis.Baseline | None = None
        self.verdict: analysis.Verdict | None = None
        self.leftovers: list[str] = []
        self.timings: dict[str, float] = {}
        self.probe_result: health.ProbeResult | None = None
        self.credentials = Credentials.generate()
        self.addresses: dict[str, str] = {}  # instance name -> fixed address picked for it
        self.early: set[str] = set()  # workers created beside their front (launch_front)
        self.tls: tls.TLSMaterial | None = None  # the deploy's CA, when it has workers
        self.result: dict = {}
        self.started = time.monotonic()

    def _renew(self) -> None:
        if self.lock is not None:
            renew(self.ctx)

    # steps that change nothing in the cloud (gates, verify) or whose own compare-and-swap
    # checks that the lock is still ours (switch: DeployLocked, else Conflict)
    _SELF_CHECKED = frozenset({"health_gate", "switch", "verify"})

    def _renew_before(self, kind: str) -> None:
        """Renew the lease before a step; before a self-checked step only once less than half
        of the lease is left (a rollback's three steps then cost no lease write)."""
        held = self.ctx.held
        if self.lock is not None and held is not None and kind in self._SELF_CHECKED:
            end = parse_utc(held.expires)
            left = (end - datetime.now(timezone.utc)).total_seconds() if end else 0.0
            if left > self.ctx.lease_s / 2:
                return
        self._renew()

    # each handler takes its step
    def apply(self) -> dict:
        """Run every step; undo on failure; return the JSON-ready result."""
        try:
            for step in self.plan.steps:
                pause_hook(step.kind, keepalive=self._renew)
                self._renew_before(step.kind)  # the lease outlives the step; DeployLocked
                if self.ctx.before_step:
                    self.ctx.before_step(step)
                t0 = time.monotonic()
                with self.ctx.reporter.step(step.describe()):
                    getattr(self, f"do_{step.kind}")(step)
                self.timings[step.kind] = round(
                    self.timings.get(step.kind, 0) + time.monotonic() - t0, 3)
                if step.kind == self._last_gate():  # the model-diff gate's figures included
                    self.notify("gated")
                elif step.kind == "switch":
                    self.notify("rolled_back" if self.plan.action == "rollback" else "switched")
                elif step.kind == "preview":
                    self.notify("previewed", f"served on {self.result['preview']['url']}")
                elif isinstance(step, EndPreview):
                    self.notify(step.outcome)
                elif step.kind == "verify" and self._analysis_pending():
                    self.analyse()  # before any retire step: blue stays warm until it passes
        except BaseException as exc:
            self.undo(exc)
            raise
        return self.summary()

    def summary(self) -> dict:
        """What happened, for --json and the closing line."""
        try:
            fip = self.ctx.cloud.find_floating_ip(self.ctx.env)
        except RolloutError as err:  # the run is done: a failed read only loses the address
            self.ctx.reporter.warn(f"could not read the floating IP for the summary: {err}")
            fip = self.observed.fip
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
            "analysis": self.verdict.to_dict() if self.verdict else None,
            "diff": self.result.get("diff"),
            "preview": self.result.get("preview"),
            "leftovers": self.leftovers,
        }

    # -- notifications and history ---------------------------------------------------------
    def event_data(self, reason: str = "") -> dict:
        """``data`` of a notification: who, what, why, and the figures so far."""
        return {"env": self.ctx.env, "action": self.plan.action, "release": self.plan.release,
                "from_release": self.observed.live, "deploy_id": self.ctx.deploy_id,
                "reason": reason,
                "figures": {"timings": dict(self.timings),
                            "switch_to_traffic_s": self.result.get("switch_to_traffic_s"),
                            "probe": self.probe_result.to_dict() if self.probe_result else None,
                            "analysis": self.verdict.to_dict() if self.verdict else None,
                            "diff": self.result.get("diff")}}

    def notify(self, event: str, reason: str = "") -> None:
        """Queue a notification (never fails, never waits: rollout/notify.py)."""
        if self.ctx.notifier is not None:
            self.ctx.notifier.emit(event, self.event_data(reason))

    def _record(self, action: str, release: str, from_release: str, detail: str = "") -> None:
        """Append a history event (best effort: a failure is a warning)."""
        if self.result.get("diff_detail"):  # the model-diff gate's figures go with the run
            detail = f"{detail} {self.result['diff_detail']}".strip()
        if self.probe_result is not None:  # and the switch probe's
            pr = self.probe_result
            detail = f"{detail} probe={pr.failed}/{pr.total} failed".strip()
        try:
            cur = self.ctx.cloud.find_floating_ip(self.ctx.env)
            if cur is not None:
                self.ctx.cloud.record_event(cur, HistoryEvent(
                    utcnow(), action, release, from_release, self.ctx.deploy_id, detail))
        except RolloutError as err:
            self.ctx.reporter.warn(f"could not record history: {err}")

    def _switch_action(self) -> str:
        # an override of the quality floor or accuracy gate is part of the record
        forced = any("overridden (--force)" in n for n in self.plan.notes)
        return self.plan.action + ("-forced" if forced else "")

    # -- the model-diff gate (rollout/diff.py) ----------------------------------------------
    def _last_gate(self) -> str:
        """The step kind after which ``gated`` is sent: the model-diff gate when planned."""
        return "diff_gate" if any(isinstance(s, DiffGate) for s in self.plan.steps) \
            else "health_gate"

    def _diff_skipped(self, why: str) -> None:
        why = why.replace("[", "(").replace("]", ")")  # a front's text: no console markup
        self.ctx.reporter.warn(f"diff skipped: {why}")
        self.result["diff"] = {"outcome": "skipped", "reason": why}
        self.result["diff_detail"] = f"diff skipped: {why}".replace(";", ",")[:120]

    def do_diff_gate(self, step: DiffGate) -> None:
        """Send the same rows (green's held-out sample, else the tool's bundle's, plus the
        --diff-sample rows) to the live front and to green, directly; refuse
        (``DiffRefused``, exit 3, undo) when the flip rate exceeds ``max_disagreement``, unless
        forced (then a plan note records the override). Green not answering fails the gate
        (``HealthCheckFailed``); the live front not answering only skips it (a warning)."""
        ctx = self.ctx
        green = self.by_name[step.front]
        if not green.address:
            green = ctx.cloud.get_instance(green.id)
        blue = self.by_name.get(step.live_front)
        gname = f"{step.front} ({step.release})"
        try:
            m = diff.measure(green.address or "", blue.address if blue else None, ctx.port,
                             step.sample, blue_name=f"the live front {step.live_front} "
                                                   f"({step.live_release})")
        except diff.GreenFailed as exc:
            if exc.sample and exc.status is not None and 400 <= exc.status < 500:
                raise PlanError(f"{gname} rejected the --diff-sample rows: {exc}; fix the "
                                "sample file") from exc
            raise HealthCheckFailed(f"{gname} did not answer the model-diff gate: {exc}; the "
                                    "live release keeps serving") from exc
        holdout_from, figures = m.holdout_from, m.figures
        if holdout_from != "green":
            ctx.reporter.info(f"held-out rows: {holdout_from} (green has no "
                              f"{diff.HOLDOUT_PATH})")
        if figures is None:
            return self._diff_skipped(m.skipped)
        refused = figures.refused(step.max_disagreement)
        outcome = "passed" if not refused else "overridden" if step.forced else "refused"
        self.result["diff"] = {"outcome": outcome, "max_disagreement": step.max_disagreement,
                               "live_release": step.live_release, "release": step.release,
                               "holdout_from": holdout_from, **figures.to_dict()}
        self.result["diff_detail"] = figures.detail() + (
            " overridden (--force)" if outcome == "overridden" else "")
        (ctx.reporter.warn if refused else ctx.reporter.info)(
            f"diff {step.live_release} -> {step.release}: {figures.line()}")
        if not refused:
            return None
        why = (f"{figures.flipped} of {figures.rows} rows flipped label between live "
               f"{step.live_release} and {step.release} (flip rate {figures.flip_rate:.2%} > "
               f"--max-disagreement {step.max_disagreement:g})")
        if step.forced:
            self.plan = replace(self.plan, notes=self.plan.notes + (
                f"model-diff gate overridden (--force): {why}",))
            ctx.reporter.warn(f"model-diff gate overridden (--force): {why}")
            return None
        raise DiffRefused(f"model-diff gate: {why}; the live release keeps serving; deploy "
                          "anyway with --force (recorded in history) or raise "
                          "--max-disagreement", self.result["diff"])

    # -- post-switch analysis ----------------------------------------------------------------
    def _analysis_pending(self) -> bool:
        return self.plan.action in ("deploy", "promote") and self.ctx.analysis_window > 0

    def analyse(self) -> None:
        """Probe the new release through the floating IP for the analysis window and judge
        it against the baseline (``analysis.py``). Passed: commit, record the switch with the
        figures. Breach: switch back at once to the previous live release (still warm, not
        re-gated), record ``analysis_failed``, raise ``AnalysisFailed`` (undo then deletes
        this run's instances). With nothing live before, the release stays live."""
        ctx, release = self.ctx, self.plan.release or ""
        pause_hook("analysis", keepalive=self._renew)
        self._renew()
        fip = ctx.cloud.find_floating_ip(ctx.env)
        if fip is None:
            raise CloudError(f"the floating IP of env {ctx.env} vanished")
        blue = self.observed.live or ""
        base = self.baseline
        with ctx.reporter.step(f"analyse {release} through {fip.address} for "
                               f"{ctx.analysis_window:g}s (vs "
                               f"{'baseline of ' + blue if base else 'absolute thresholds'})"):
            t0 = time.monotonic()
            verdict = analysis.watch(fip.address, ctx.port, ctx.analysis_window, base,
                                     ctx.thresholds, keepalive=self._renew)
            self.timings["analysis"] = round(time.monotonic() - t0, 3)
            self.verdict = verdict
            detail = verdict.detail()
            if verdict.passed:
                ctx.reporter.info(f"analysis passed: {detail}")
                self.committed = True
                self._record(self._switch_action(), release, blue, "analysis passed " + detail)
                self.notify("analysis_passed", verdict.reason)
                return
            ctx.reporter.warn(f"analysis failed: {verdict.reason} ({detail})")
            if not blue or self.switched_from is None or not self.switched_from.target:
                self.committed = True  # nothing to roll back to: it stays live
                self._record("analysis_failed", release, blue, detail + " left live")
                self.notify("analysis_failed", verdict.reason + "; left live: nothing to roll "
                            "back to")
                raise AnalysisFailed(
                    f"post-switch analysis of {release} failed: {verdict.reason}; it stays "
                    f"live in {ctx.env}: there is no previous release to roll back to "
                    f"(deploy a fixed release: python -m rollout deploy --env {ctx.env} "
                    "--release R)", verdict, rolled_back=False)
            self.notify("analysis_failed", verdict.reason)
            problems: list[str] = []
            with cancel.deferred(raise_pending=False):
                back = self._switch_back(problems)  # at once, no re-gate: blue is warm
            if back:
                self.switched_from = None  # done: undo must not move it again
                ctx.reporter.warn(f"switched back to {blue}")
            self._record("analysis_failed", release, blue,
                         detail + (f" rolled back to {blue}" if back else " switch-back failed"))
            if back:
                self.notify("rolled_back", f"analysis failed: {verdict.reason}")
            exc = AnalysisFailed(
                f"post-switch analysis of {release} failed: {verdict.reason}; "
                + (f"the floating IP serves {blue} again" if back else
                   f"switching back to {blue} failed"), verdict, rolled_back=back)
            for text in problems:
                add_also(exc, text)
            raise exc

    # -- undo ----------------------------------------------------------------------------
    def undo(self, exc: BaseException) -> None:
        """Put the floating IP back (if moved, unverified, and still carrying our lock) and
        delete what this run made; signals are deferred meanwhile; errors met here are
        reported beside ``exc`` (``add_also``), never instead of it.

        Once the switch is verified the new release is live and healthy: it is the truth now,
        and nothing it runs on is deleted (a later failure, e.g. retiring, is only reported).
        """
        ctx = self.ctx
        if self.committed:
            ctx.reporter.warn(f"{self.plan.release} is live and verified; a later step failed")
            return
        problems: list[str] = []
        with cancel.deferred(raise_pending=False):
            if self.preview_aimed:
                self._unpoint_preview(problems)
            if self.switched_from is not None and not self._switch_back(problems):
                # the floating IP may still point at our set: deleting it would leave the
                # env serving nothing; keep it, and say so
                ctx.reporter.warn(f"keeping this run's instances: the floating IP of env "
                                  f"{ctx.env} may still point at them")
                problems.append(f"kept this run's instances ({', '.join(self.created)}): the "
                                "floating IP may still point at them; check "
                                f"python -m rollout status --env {ctx.env}")
                self.created = []
            if self.preview_lent is not None:
                self._give_back_preview(problems)
            if any(n not in self.by_name for n in self.created):
                try:  # a create interrupted before it returned: find its id by name
                    for i in ctx.cloud.list_instances(ctx.env):
                        if i.name in self.created and i.name not in self.by_name:
                            self.by_name[i.name] = i
                except Exception as err:  # noqa: BLE001 - report, keep undoing
                    problems.append(f"could not list instances: {err}")
            for name in reversed(self.created):
                inst = self.by_name.get(name)
                inst_id = inst.id if inst else name
                try:
                    ctx.cloud.delete_instance(inst_id)
                    ctx.reporter.info(f"deleted {name} (created by this run)")
                except Exception as err:  # noqa: BLE001 - report, keep undoing
                    ctx.reporter.warn(f"could not delete {name}: {err}")
                    problems.append(f"could not delete {name}: {err}")
                    self.leftovers.append(name)
        for text in problems:
            add_also(exc, text)
        if self.leftovers and isinstance(exc, RolloutError):
            exc.args = (f"{exc.args[0] if exc.args else exc}; left behind: "
                        f"{', '.join(self.leftovers)} — python -m rollout cleanup --env "
                        f"{ctx.env}",)

    def _switch_back(self, problems: list[str]) -> bool:
        """Put the floating IP back where it was; False if it may still point at our set."""
        ctx, old = self.ctx, self.switched_from
        assert old is not None
        ours = {i.port for n, i in self.by_name.items() if n in self.created and i.port}
        if self.switched_to:
            ours.add(self.switched_to)  # a reused warm front we switched to
        try:
            cur = ctx.cloud.find_floating_ip(ctx.env)
            if cur is None:
                raise CloudError("the floating IP vanished")
            moved = cur.target != old.target
            restated = (cur.state.live, cur.state.previous) != (old.state.live,
                                                               old.state.previous)
            if not moved and not restated:
                return True  # it never moved, and says what it said before
            if moved and cur.target not in ours:
                return True  # someone else moved it: not ours to touch, nor to lose
            held = cur.state.lock
            if self.lock is None and held is not None:  # a lock-free run never crosses one
                raise CloudError(f"not switching the floating IP back: env {ctx.env} is now "
                                 f"locked by {held.holder} (deploy {held.deploy_id})")
            if self.lock is not None and (not held or held.deploy_id != self.lock.deploy_id):
                raise CloudError(f"not switching the floating IP back: the env's lock is now "
                                 f"{held.holder + ' (deploy ' + held.deploy_id + ')' if held else 'gone'}")
            ctx.cloud.update_floating_ip(cur, target=old.target,
                                         state=replace(old.state, lock=held),
                                         if_revision=cur.revision)
            ctx.reporter.warn(f"floating IP switched back to {old.target}")
            return True
        except Exception as err:  # noqa: BLE001 - report, keep undoing
            ctx.reporter.warn(f"could not switch the floating IP back: {err}")
            problems.append(f"could not switch the floating IP back: {err}")
            self.leftovers.append(f"floating-ip:{ctx.env}")
            return False

    # -- step handlers ---------------------------------------------------------------------
    def do_create_floating_ip(self, step: CreateFloatingIP) -> None:
        """Normally done while taking the lock; kept for plans made without one."""
        if self.ctx.cloud.find_floating_ip(step.env) is None:
            self.ctx.cloud.create_floating_ip(step.env)

    def do_delete_instances(self, step: DeleteInstances) -> None:
        for name in step.instances:
            inst = self.by_name.get(name)
            self.ctx.cloud.delete_instance(inst.id if inst else name)

    def do_retire(self, step: Retire) -> None:
        try:
            self.do_delete_instances(DeleteInstances(step.instances, "retired"))
        except (RolloutError, OSError) as err:
            self.ctx.reporter.warn(f"retiring {step.release} failed: {err}")
            self.leftovers.extend(step.instances)

    def do_delete_image(self, step: DeleteImage) -> None:
        rel = self.observed.release(step.release)
        if rel is not None:
            self.ctx.cloud.delete_release(rel)

    def _launch(self, name: str, release: str, params: SeedParams, role: str) -> Instance:
        self._create(name, release, params, role)
        return self._wait_up(name)

    def _create(self, name: str, release: str, params: SeedParams, role: str) -> Instance:
        ctx = self.ctx
        rel = self.observed.release(release)
        if rel is None:
            raise PlanError(f"image of release {release} vanished")
        labels = {"env": ctx.env, "release": release, "colour": params.colour, "role": role,
                  "deploy_id": ctx.deploy_id, "created_at": utcnow(),
                  "model_sha256": rel.model_sha256}
        spec = InstanceSpec(name, rel, labels, render_user_data(params), ctx.flavor,
                            address=self.addresses.get(name))
        self.created.append(name)  # registered before the call: a signal mid-create cleans too
        inst = ctx.cloud.create_instance(spec)
        self.by_name[name] = inst
        return inst

    def _wait_up(self, name: str) -> Instance:
        inst = self.ctx.cloud.wait_for_instance(self.by_name[name].id,
                                                timeout=self.ctx.boot_timeout)
        self.by_name[name] = inst
        self.ctx.reporter.info(f"{name} is up at {inst.address}")
        return inst

    def _seed(self, role: str, release: str, colour: str, **kw) -> SeedParams:
        return SeedParams(role=role, colour=colour, release=release,
                          deploy_id=self.ctx.deploy_id, env=self.ctx.env,
                          credentials=self.credentials, port=self.ctx.port,
                          worker_concurrency=self.ctx.worker_concurrency, **kw)

    def do_launch_front(self, step: LaunchFront) -> None:
        kw: dict = {"broker_bind": step.broker_bind}
        workers = [n for s in self.plan.steps if isinstance(s, LaunchWorkers)
                   and s.front == step.name for n in s.names]
        if workers:
            # the front's seed names its workers (its broker firewall) and its own address
            # (its certificate): both fixed now, where the cloud allows (rollout/tls.py)
            picked = self.ctx.cloud.pick_addresses(1 + len(workers))
            if picked:
                self.addresses.update(zip([step.name, *workers], picked, strict=True))
            self.tls = tls.generate(self.addresses.get(step.name))
            kw.update(tls=self.tls, broker_peers=tuple(
                self.addresses[w] for w in workers if w in self.addresses))
        self._create(step.name, step.release,
                     self._seed("front", step.release, step.colour, **kw), "front")
        # Workers whose addresses are fixed need nothing of the running front (its address is
        # fixed too): create them now, so they boot beside it and their addresses are held by
        # the cloud from this moment, not only in this process's memory until their own step.
        early = workers if step.name in self.addresses else []  # picked for all, or none
        for name in early:
            self._create(name, step.release, self._seed(
                "worker", step.release, step.colour, broker_host=self.addresses[step.name],
                tls=self.tls), "worker")
        if early:
            self.early.update(early)
            self.ctx.reporter.info(f"{', '.join(early)} created beside the front")
        self._wait_up(step.name)

    def do_launch_workers(self, step: LaunchWorkers) -> None:
        front = self.by_name[step.front]
        for name in step.names:
            if name in self.early:  # created beside its front: wait for its boot only
                self._wait_up(name)
                continue
            self._launch(name, step.release,
                         self._seed("worker", step.release, step.colour,
                                    broker_host=front.address, tls=self.tls), "worker")

    def do_health_gate(self, step: HealthGate) -> None:
        ctx = self.ctx
        front = self.by_name[step.front]
        if not front.address:
            front = ctx.cloud.get_instance(front.id)
        full = getattr(step, "full", step.front in self.created)
        policy = HEALTH_GATE.with_budget(ctx.health_timeout) if full else ROLLBACK_HEALTH
        deploy_id = front.deploy_id
        rel = self.observed.release(step.release) or step.release

        def attempt() -> dict:
            return health.check_front(front.address or "", release=rel,
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
        if step.workers:  # invariant I7: each worker seen serving on the front's broker
            try:
                policy.run(lambda: health.check_workers(
                    front.address or "", ctx.port, step.workers, step.model_sha256,
                    front=front.name), sleep=ctx.sleep, what=f"workers of {front.name}")
            except WaitTimeout as exc:
                raise HealthCheckFailed(f"workers of {front.name} ({step.release}) were not "
                                        f"seen serving: {exc}; the live release keeps serving"
                                        ) from exc

    def do_switch(self, step: Switch) -> None:
        ctx = self.ctx
        front = self.by_name[step.front]
        # lock-free (cas): the floating IP as observed; the update below is conditional on
        # its revision, so the observation and the gate still hold when it succeeds
        fip = self.observed.fip if self.cas else ctx.cloud.find_floating_ip(ctx.env)
        if fip is not None and self._analysis_pending() and fip.target:
            self._baseline(step, fip)  # on the live release, before the switch
            fip = ctx.cloud.find_floating_ip(ctx.env)  # the lease was renewed meanwhile
        if fip is None:
            raise CloudError(f"the floating IP of env {ctx.env} vanished")
        if self.lock and (not fip.state.lock or fip.state.lock.deploy_id != self.lock.deploy_id):
            raise DeployLocked(ctx.env, *(
                (fip.state.lock.holder, fip.state.lock.since, fip.state.lock.deploy_id)
                if fip.state.lock else ("nobody (our lock was broken)", "-", "-")))
        probe = None
        if ctx.probe and fip.target:
            probe = health.Probe(fip.address, port=ctx.port).start()
            # let the probe see the old release first (at most 0.15 s)
            probe.wait_seen(lambda _r: True, sleep=ctx.sleep)
        state = FipState(live=step.release, previous=step.previous or "",
                         lock=fip.state.lock if self.lock else None,
                         preview=None if self.plan.action == "promote" else fip.state.preview)
        if self.plan.action == "promote":
            self._lend_preview_address()
        self.switched_from, self.switched_to = fip, front.port
        t0 = time.monotonic()
        try:
            try:
                ctx.cloud.update_floating_ip(fip, target=front.port, state=state,
                                             if_revision=fip.revision)
            except Conflict as exc:
                if not self.cas:
                    raise
                self.switched_from = None  # nothing moved: nothing to put back
                raise StaleObservation(f"the floating IP of env {ctx.env} changed after it "
                                       f"was observed ({exc})") from exc
            self._verify(step.release, fip.address, t0)
        finally:
            if probe is not None:  # and the new one after (at most 0.15 s)
                probe.wait_seen(lambda r: r == step.release, sleep=ctx.sleep)
                self.probe_result = probe.stop()
                res = self.probe_result
                line = (f"probe: {res.failed} failed of {res.total} requests during the "
                        f"switch ({dict(res.by_release)})")
                (ctx.reporter.warn if res.failed else ctx.reporter.info)(
                    line + (f" errors: {dict(res.errors)}" if res.failed else ""))
        if not self._analysis_pending():  # else recorded with the analysis' outcome
            self._record(self._switch_action(), step.release, step.from_release or "")

    def _baseline(self, step: Switch, fip: FloatingIP) -> None:
        """The analysis' baseline: the probe on the live release through the floating IP
        for min(5 s, window / 3)."""
        ctx = self.ctx
        secs = analysis.baseline_seconds(ctx.analysis_window)
        with ctx.reporter.step(f"baseline: probe {step.from_release or fip.target} "
                               f"through {fip.address} for {secs:g}s"):
            self.baseline = analysis.measure(fip.address, ctx.port, secs)
        b = self.baseline.figures
        ctx.reporter.info(f"baseline: {b.requests} requests, {b.error_rate:.2%} errors, "
                          f"p50 {b.p50_ms or 0:.0f} ms, p99 {b.p99_ms or 0:.0f} ms")
        self._renew()

    def _seen(self, release: str, address: str, what: str = "the floating IP") -> None:
        """Wait (VERIFY_SWITCH) until /version through ``address`` names ``release``."""
        def seen() -> dict:
            v = health.fetch_version(address, self.ctx.port)
            if v.get("release") != release:
                raise health.NotReady(f"{what} still serves {v.get('release')}")
            return v

        try:
            VERIFY_SWITCH.run(seen, sleep=self.ctx.sleep, what=f"/version via {address}")
        except WaitTimeout as exc:
            raise HealthCheckFailed(f"after the switch {what} did not serve {release}: "
                                    f"{exc}") from exc

    def _verify(self, release: str, address: str, t0: float) -> None:
        self._seen(release, address)
        self.result["switch_to_traffic_s"] = round(time.monotonic() - t0, 3)
        self.verified = True
        # with an analysis to come and a release to go back to, not yet the truth
        self.committed = not (self._analysis_pending() and self.switched_from is not None
                              and bool(self.switched_from.target))
        self.ctx.reporter.info(f"{address} serves {release} "
                               f"({self.result['switch_to_traffic_s']}s after the switch)")

    # -- preview, promote, abort -------------------------------------------------------------
    def _preview_fip(self, create: bool) -> FloatingIP | None:
        """The env's preview floating IP (``<env>.preview``), allocated once and kept: the
        preview address is stable across deploys."""
        cloud, penv = self.ctx.cloud, preview_env(self.ctx.env)
        fip = cloud.find_floating_ip(penv)
        if fip is None and create:
            with contextlib.suppress(Conflict):  # a racing creator: use the env's one
                cloud.create_floating_ip(penv)
            fip = cloud.find_floating_ip(penv)
            if fip is None:
                raise CloudError(f"the preview floating IP of env {self.ctx.env} vanished")
        return fip

    def _main_state(self, **changes) -> None:
        """One CAS update of the env's floating IP state (target unchanged; under our lock);
        none when the state already says so."""
        cur = self.ctx.cloud.find_floating_ip(self.ctx.env)
        if cur is None:
            raise CloudError(f"the floating IP of env {self.ctx.env} vanished")
        state = replace(cur.state, **changes)
        if state != cur.state:
            self.ctx.cloud.update_floating_ip(cur, target=cur.target, state=state,
                                              if_revision=cur.revision)

    def _aim_preview(self, target: str | None, *, create: bool = False,
                     only_if_idle: bool = False) -> FloatingIP | None:
        """Point the env's preview address at ``target`` (an instance's port; None: at
        nothing), its state naming the release it then serves; no call when it already does
        (``only_if_idle``: nor when it points elsewhere). None when there is no preview
        address."""
        pfip = self._preview_fip(create=create)
        if pfip is None or pfip.target == target or (only_if_idle and pfip.target):
            return pfip
        state = FipState(live=self.plan.release or "") if target else FipState()
        return self.ctx.cloud.update_floating_ip(pfip, target=target, state=state,
                                                 if_revision=pfip.revision)

    def do_preview(self, step: StartPreview) -> None:
        """Aim the preview address at the gated front and check it serves the release, then
        record the pending preview on the env's floating IP (from then on the run is done:
        the set stays for promote or abort)."""
        ctx = self.ctx
        front = self.by_name[step.front]
        self.preview_aimed = True  # before the call: undo clears it even if the answer is lost
        pfip = self._aim_preview(front.port, create=True)
        assert pfip is not None
        self._seen(step.release, pfip.address, "the preview address")
        self._main_state(preview=Preview(step.release, step.deploy_id))
        self.committed, self.preview_aimed = True, False
        url = health.base_url(pfip.address, ctx.port) + "/"
        self.result["preview"] = {"release": step.release, "deploy_id": step.deploy_id,
                                  "address": pfip.address, "url": url}
        ctx.reporter.info(f"preview: {url} serves {step.release}; the floating IP still serves "
                          f"{self.observed.live or 'nothing'}")
        self._record("preview", step.release, self.observed.live or "", f"at {pfip.address}")

    def _lend_preview_address(self) -> None:
        """Promote: Neutron allows one floating IP per fixed IP, so the preview address lets
        go of green before the floating IP takes it (undo points it back)."""
        pfip = self._preview_fip(create=False)
        if pfip is not None and pfip.target:
            self.preview_lent = pfip.target
            self._aim_preview(None)

    def _give_back_preview(self, problems: list[str]) -> None:
        """Undo of a promote: the preview address serves green again (after the floating IP
        went back to blue), so the preview stays pending as it was."""
        try:
            self._aim_preview(self.preview_lent, only_if_idle=True)
        except Exception as err:  # noqa: BLE001 - report, keep undoing
            problems.append(f"could not point the preview address back at "
                            f"{self.plan.release}: {err}")
        self.preview_lent = None

    def _unpoint_preview(self, problems: list[str]) -> None:
        """Undo of a preview: the preview address serves nothing again."""
        try:
            self._aim_preview(None)
        except Exception as err:  # noqa: BLE001 - report, keep undoing
            problems.append(f"could not clear the preview address: {err}")
        self.preview_aimed = False

    def do_end_preview(self, step: EndPreview) -> None:
        """The preview address serves nothing, the pending preview is cleared (a promote's
        switch cleared it already); an abort is recorded in history."""
        self._aim_preview(None)  # a failure here is the step's (its own error class)
        self._main_state(preview=None)
        if step.outcome == "aborted":
            self._record("abort", step.release, self.observed.live or "")

    def do_verify(self, step: Verify) -> None:
        if not self.verified:  # the switch verifies itself; this covers a re-run plan
            fip = self.ctx.cloud.find_floating_ip(self.ctx.env)
            if fip is None:
                raise CloudError(f"the floating IP of env {self.ctx.env} vanished")
            self._verify(step.release, fip.address, time.monotonic())


# -- the commands ----------------------------------------------------------------------------
def _notes(ctx: Context, plan: Plan) -> None:
    for note in plan.notes:
        ctx.reporter.info(note)


def deploy(ctx: Context, req: DeployRequest) -> dict:
    """Plan without the lock (a refusal changes nothing), lock, observe, re-plan, apply.

    A reused warm set that fails its gate is replaced once by a fresh set (invariant I11)."""
    first = observe(ctx)
    plan = plan_deploy(first, req)
    if not plan.steps:
        _notes(ctx, plan)
        return Executor(ctx, first, None, plan).summary()
    with env_lock(ctx) as lock:
        observed = observe(ctx)
        plan = plan_deploy(observed, req)
        check_spared(observed, plan)
        _notes(ctx, plan)
        ex = Executor(ctx, observed, lock, plan)
        with _notified(ex):
            try:
                return ex.apply()
            except HealthCheckFailed as exc:
                if not any(isinstance(s, HealthGate) and getattr(s, "reused", False)
                           for s in plan.steps) or not hasattr(req, "reuse_warm"):
                    raise
                ctx.reporter.warn(f"the reused warm set failed its gate ({exc}); launching a "
                                  "fresh set")
                observed = observe(ctx)
                plan = plan_deploy(observed, replace(req, reuse_warm=False))
                check_spared(observed, plan)
                _notes(ctx, plan)
                ex.__init__(ctx, observed, lock, plan)  # the same run, a fresh set
                return ex.apply()


@contextlib.contextmanager
def _notified(ex: Executor, *, started: bool = True):
    """``started`` now; ``failed`` (with the reason) if the run ends by an exception other
    than an analysis failure (which sent its own ``analysis_failed``/``rolled_back``). A run
    that the release itself failed (gate, diff gate, refusal, a wait) is also recorded in
    history as ``failed`` with the reason; a cloud error or a signal is not (one more cloud
    call would only delay the exit)."""
    if started:
        ex.notify("started", "; ".join(ex.plan.notes))
    try:
        yield
    except (AnalysisFailed, StaleObservation):  # the latter: retried under the lock
        raise
    except BaseException as exc:
        reason = also_text(exc) or type(exc).__name__
        if isinstance(exc, HealthCheckFailed | PlanError | WaitTimeout):
            ex._record("failed", ex.plan.release or "", ex.observed.live or "",  # noqa: SLF001
                       " ".join(reason.split()).replace(";", ",")[:200])
        ex.notify("failed", reason)
        raise


def promote(ctx: Context, req: PromoteRequest) -> dict:
    """Switch to the pending preview's set (gate, switch with the probe, analysis), end the
    preview, retire beyond ``keep``."""
    return _apply_locked(ctx, plan_promote, req)


def abort(ctx: Context, req: AbortRequest) -> dict:
    """End the pending preview and delete its set (never live or previous instances)."""
    return _apply_locked(ctx, plan_abort, req, announce=True)


def _apply_locked(ctx: Context, plan_fn, req, *, announce: bool = False) -> dict:
    """Plan without the lock (a refusal changes nothing), lock, observe, re-plan, guard (I1),
    print the notes (``announce``: every step, before any is taken), apply."""
    plan_fn(observe(ctx), req)
    with env_lock(ctx, create=False) as lock:
        observed = observe(ctx)
        plan = plan_fn(observed, req)
        check_spared(observed, plan)
        _notes(ctx, plan)
        if announce:
            for step in plan.steps:
                ctx.reporter.info(f"will {step.describe()}")
        ex = Executor(ctx, observed, lock, plan)
        with _notified(ex):
            return ex.apply()


def rollback(ctx: Context, req: RollbackRequest) -> dict:
    """Observe and plan without the lock; then, when nobody holds the env's lock, gate the
    target and switch with ONE compare-and-swap from the observed floating IP's revision (no
    lock, switch, unlock: one floating-IP update instead of three). Every lock taken, renewed
    or released and every switch bumps that revision, and instances change only under the
    lock, so the update succeeds only if nothing changed since the observation: exactly what
    holding the lock would have guaranteed. If it loses (``StaleObservation``: nothing moved)
    or the env is locked, the rollback runs the locked way: lock (or ``DeployLocked``, or a
    takeover), observe again, re-plan, apply, unlock. No instance is created either way."""
    first = observe(ctx)
    plan = plan_rollback(first, req)
    announced = False
    if first.fip is not None and first.fip.state.lock is None:
        ex = Executor(ctx, first, None, plan, cas=True)
        try:
            with _notified(ex):
                return ex.apply()
        except StaleObservation as exc:
            announced = True
            ctx.reporter.info(f"{exc}; rolling back under the env's lock")
            first = observe(ctx)
            plan_rollback(first, req)
    with env_lock(ctx, create=False) as lock:
        observed = _observe_again(ctx, first)
        plan = plan_rollback(observed, req)
        ex = Executor(ctx, observed, lock, plan)
        with _notified(ex, started=not announced):
            return ex.apply()


def _observe_again(ctx: Context, first: Deployment) -> Deployment:
    """The observation under the lock. Rollout changes an env's instances only under its
    lock (a target removed behind its back fails the quick gate that follows), and every lock
    taken or released is a CAS that bumps the floating IP's revision: if
    the floating IP read now is the first one plus our own lock (revision + 1, no lock taken
    over), the first observation's instances and images still hold and only the floating IP
    is read again (one call instead of three); otherwise everything is observed again."""
    fip = ctx.cloud.find_floating_ip(ctx.env)
    try:
        only_ours = (ctx.took_over is None and first.fip is not None and fip is not None
                     and fip.id == first.fip.id
                     and int(fip.revision) == int(first.fip.revision) + 1)
    except (TypeError, ValueError):
        only_ours = False
    return first.with_fip(fip) if only_ours else observe(ctx)


def cleanup(ctx: Context, *, keep: int, images: bool, break_lock: bool) -> dict:
    """Plan without the lock; if there is something to do (or a lock to break): lock (taking
    over a dead run's lock, whose instances then go: I11; an env without a floating IP gets
    one just for the lock), observe, re-plan, print what will be deleted, apply."""
    req = CleanupRequest(ctx.env, keep, images, _elsewhere(ctx))
    first = observe(ctx)
    held = first.fip.state.lock if first.fip else None
    plan = plan_cleanup(first, replace(req, active_deploy_id=held.deploy_id if held else ""))
    if not plan.steps and held is None:
        return Executor(ctx, first, None, plan).summary()
    with env_lock(ctx, break_lock=break_lock, create=first.fip is None,
                  temporary=True) as lock:
        dead = ctx.took_over.deploy_id if ctx.took_over else ""
        observed = observe(ctx)
        plan = plan_cleanup(observed, replace(req, dead_deploy_id=dead))
        check_spared(observed, plan, dead)
        for step in plan.steps:
            ctx.reporter.info(f"will {step.describe()}")
        return Executor(ctx, observed, lock, plan).apply()


def _elsewhere(ctx: Context) -> frozenset[str]:
    every = ctx.cloud.list_instances(None)
    return frozenset(i.release for i in every if i.env != ctx.env)


def plan_only(ctx: Context, req: DeployRequest) -> dict:
    """Dry run: the plan, nothing changed (no lock taken). The model-diff gate's step also
    says how many rows it will compare (the held-out rows counted from the tool's bundle:
    green's own sample is used when it serves one) and, when the target's front is already
    running (a warm set the deploy would reuse), the real figures (predictions only)."""
    observed = observe(ctx)
    plan = plan_deploy(observed, req)
    out = plan.to_dict()
    for step, d in zip(plan.steps, out["steps"], strict=True):
        if isinstance(step, DiffGate):
            d["holdout_rows"] = len(diff.bundle_holdout())
            d["rows"] = d["holdout_rows"] + d["sample_rows"]
            d.update(_plan_diff_figures(ctx, observed, step))
    return out


def _plan_diff_figures(ctx: Context, observed: Deployment, step: DiffGate) -> dict:
    """``{"figures": ...}`` measured on a warm running front of the target (read-only), or
    ``{}`` when it is not running yet."""
    by_name = {i.name: i for i in observed.instances}
    green, blue = by_name.get(step.front), by_name.get(step.live_front)
    if green is None or green.status != "RUNNING" or not green.address:
        return {}
    try:
        m = diff.measure(green.address, blue.address if blue else None, ctx.port, step.sample)
    except diff.PredictError as exc:
        return {"figures": {"skipped": f"{step.front} did not answer: {exc}"}}
    if m.figures is None:
        return {"figures": {"skipped": m.skipped}}
    f = m.figures.to_dict()
    return {"rows": f["rows"], "figures": {
        **{k: f[k] for k in ("agreement", "flipped", "flip_rate", "mean_abs_change",
                             "max_abs_change")},
        "would_refuse": m.figures.refused(step.max_disagreement),
        "holdout_from": m.holdout_from}}
