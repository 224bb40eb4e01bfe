"""Pure planning: observed ``Deployment`` + request in, the steps still needed out.

Nothing here talks to a cloud or the clock, so every rule is tested from data files
(tests/data/plan/*.yaml). Steps name instances by *name* (an OpenStack id exists only after
creation); the executor maps names to instances. Re-planning after a crash is safe: a set of
instances that is complete and running is reused, a partial one is replaced.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from rollout.clouds.base import RUNNING, Deployment, Instance, Release
from rollout.errors import PlanError

NAME_MAX = 63  # LXD instance names; also a valid hostname label
#: The quality floor when neither the request (--min-accuracy) nor the image
#: (modelserve_accuracy_floor) gives one: the committed bundle's ``accuracy_floor``
#: (majority-class baseline of its held-out set + 0.05; tests check they agree).
DEFAULT_ACCURACY_FLOOR = 0.7217
BAKE_HINT = "bake one with `make image RELEASE=<id>` (packer/bake.py marks it provenance=release)"


# -- requests ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DeployRequest:
    """What the operator asked ``deploy`` (or ``plan``) for."""

    env: str
    deploy_id: str
    release: str | None = None  # None: the newest image baked from a real release
    workers: int = 0  # extra worker-only instances
    keep: int = 2  # releases kept warm in the env (live included), >= 2
    force: bool = False  # override the quality floor and the accuracy gate (noted in the plan)
    accuracy_tolerance: float = 0.01
    min_accuracy: float | None = None  # quality floor; None: the image's, else the default
    reuse_warm: bool = True  # False: never reuse a warm set (after a reused set failed the gate)
    max_disagreement: float = 0.25  # model-diff gate: refuse above this share of rows flipped
    diff_sample: tuple = ()  # rows of --diff-sample (loaded and validated by the CLI)
    preview: bool = False  # launch and gate, then serve it on the preview address: no switch
    promote: bool = False  # plan_promote's own request: the pending preview is the target


@dataclass(frozen=True)
class PromoteRequest:
    """What the operator asked ``promote`` for (the release is the pending preview's)."""

    env: str
    deploy_id: str
    keep: int = 2
    force: bool = False
    accuracy_tolerance: float = 0.01
    min_accuracy: float | None = None


@dataclass(frozen=True)
class AbortRequest:
    """What the operator asked ``abort`` for."""

    env: str
    deploy_id: str


@dataclass(frozen=True)
class RollbackRequest:
    """What the operator asked ``rollback`` for."""

    env: str
    deploy_id: str
    to: str | None = None  # None: the recorded previous release


@dataclass(frozen=True)
class CleanupRequest:
    """What the operator asked ``cleanup`` for."""

    env: str
    keep: int = 2
    images: bool = False  # also delete images beyond --keep (never one any instance uses)
    in_use_elsewhere: frozenset[str] = frozenset()  # releases used by instances of other envs
    active_deploy_id: str = ""  # a deploy that holds the lock: its instances are protected
    dead_deploy_id: str = ""  # the deploy id of a lock just broken: that run's instances go


# -- steps -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One thing the executor does; ``to_dict`` is what plan files and --json show."""

    kind: ClassVar[str] = "step"

    def to_dict(self) -> dict:
        """``{"kind": ..., **fields}`` with tuples as lists."""
        d = {"kind": self.kind}
        for k, v in asdict(self).items():
            d[k] = list(v) if isinstance(v, tuple) else v
        return d

    def describe(self) -> str:
        """A one-line human description."""
        return self.kind


@dataclass(frozen=True)
class CreateFloatingIP(Step):
    kind: ClassVar[str] = "create_floating_ip"
    env: str

    def describe(self) -> str:
        return f"allocate the floating IP of env {self.env}"


@dataclass(frozen=True)
class DeleteInstances(Step):
    kind: ClassVar[str] = "delete_instances"
    instances: tuple[str, ...]
    reason: str

    def describe(self) -> str:
        return f"delete {', '.join(self.instances)} ({self.reason})"


@dataclass(frozen=True)
class LaunchFront(Step):
    kind: ClassVar[str] = "launch_front"
    name: str
    release: str
    colour: str
    broker_bind: str  # 0.0.0.0 when worker instances must reach its broker

    def describe(self) -> str:
        return f"launch front {self.name} ({self.release}, {self.colour})"


@dataclass(frozen=True)
class LaunchWorkers(Step):
    kind: ClassVar[str] = "launch_workers"
    names: tuple[str, ...]
    release: str
    colour: str
    front: str  # the front whose broker they use

    def describe(self) -> str:
        return f"launch workers {', '.join(self.names)} -> broker of {self.front}"


@dataclass(frozen=True)
class HealthGate(Step):
    kind: ClassVar[str] = "health_gate"
    release: str
    front: str
    workers: tuple[str, ...]
    model_sha256: str
    full: bool = True  # the full HEALTH_GATE budget (deploys, reused warm sets); False: rollback
    reused: bool = False  # the set is a warm one being reused (on failure: replan, no reuse)

    def describe(self) -> str:
        what = "reused warm set, full gate" if self.reused else (
            "full gate" if self.full else "quick gate")
        return (f"health-gate {self.front} (readyz + identity + prediction + workers, model "
                f"{self.model_sha256[:12]}; {what})")


@dataclass(frozen=True)
class DiffGate(Step):
    """The model-diff gate (rollout/diff.py): the same rows to the live front and the new one,
    directly; refuse when more than ``max_disagreement`` of the rows flipped label, unless
    ``forced`` (then recorded as overridden). ``sample``: the --diff-sample rows (shown as a
    count)."""

    kind: ClassVar[str] = "diff_gate"
    release: str
    front: str
    live_release: str
    live_front: str
    max_disagreement: float
    forced: bool = False
    sample: tuple = ()

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("sample")
        d["sample_rows"] = len(self.sample)
        return d

    def describe(self) -> str:
        extra = f" + {len(self.sample)} sample rows" if self.sample else ""
        return (f"model-diff gate: {self.live_front} ({self.live_release}) vs {self.front} on "
                f"the held-out rows{extra}; refuse above a flip rate of "
                f"{self.max_disagreement:g}" + (" (--force: recorded only)" if self.forced else ""))


@dataclass(frozen=True)
class Switch(Step):
    kind: ClassVar[str] = "switch"
    release: str
    front: str
    from_release: str | None
    previous: str | None  # the rollback target recorded after the switch

    def describe(self) -> str:
        return f"point the floating IP at {self.front} ({self.from_release or '-'} -> " \
               f"{self.release})"


@dataclass(frozen=True)
class Verify(Step):
    kind: ClassVar[str] = "verify"
    release: str

    def describe(self) -> str:
        return f"check /version through the floating IP shows {self.release}"


@dataclass(frozen=True)
class StartPreview(Step):
    kind: ClassVar[str] = "preview"
    release: str
    front: str
    deploy_id: str  # the set's deploy id: this run's, or a reused warm set's

    def describe(self) -> str:
        return (f"point the preview address at {self.front} ({self.release}); the floating IP "
                "is not moved")


@dataclass(frozen=True)
class EndPreview(Step):
    kind: ClassVar[str] = "end_preview"
    release: str
    outcome: str  # promoted | aborted

    def describe(self) -> str:
        return f"end the preview of {self.release} ({self.outcome}): the preview address " \
               "serves nothing until the next preview"


@dataclass(frozen=True)
class Retire(Step):
    kind: ClassVar[str] = "retire"
    release: str
    instances: tuple[str, ...]

    def describe(self) -> str:
        return f"retire {self.release}: delete {', '.join(self.instances)}"


@dataclass(frozen=True)
class DeleteImage(Step):
    kind: ClassVar[str] = "delete_image"
    release: str
    image: str

    def describe(self) -> str:
        return f"delete image {self.image} ({self.release})"


@dataclass(frozen=True)
class Plan:
    """The planner's answer: steps plus notes for the operator (why, what was skipped)."""

    action: str
    release: str | None
    steps: tuple[Step, ...]
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"action": self.action, "release": self.release,
                "steps": [s.to_dict() for s in self.steps], "notes": list(self.notes)}


# -- helpers -----------------------------------------------------------------------------
def slug(text: str) -> str:
    """Lowercase [a-z0-9-] for instance names."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "x"


def instance_name(env: str, release: str, role: str, index: int, deploy_id: str) -> str:
    """``ms-<env>-<release>-<role><n>-<deploy6>``, the release part cut to fit 63 chars."""
    tail = f"-{role}{index}-{slug(deploy_id)[:6]}"
    head = f"ms-{slug(env)}-"
    room = NAME_MAX - len(head) - len(tail)
    return f"{head}{slug(release)[:room].rstrip('-')}{tail}"


def other_colour(colour: str | None) -> str:
    """blue <-> green; the first release is blue."""
    return "green" if colour == "blue" else "blue"


def release_sets(observed: Deployment, release: str) -> dict[str, list[Instance]]:
    """One release's instances grouped by deploy id."""
    sets: dict[str, list[Instance]] = {}
    for inst in observed.instances_of(release):
        sets.setdefault(inst.deploy_id, []).append(inst)
    return sets


def warm_set(observed: Deployment, release: str, workers: int | None = None,
             trusted: frozenset[str] | None = None) -> tuple[Instance, list[Instance]] | None:
    """The newest complete running set of ``release`` (front + workers), if any.

    The live front's set always wins for the live release. ``workers`` None accepts any
    number of running workers; otherwise the count must match. ``trusted`` (deploy ids)
    limits the candidates to sets of runs known to have finished (invariant I11: a dead
    run's leftovers are never reused).
    """
    live = observed.live_instance
    candidates = []
    for deploy_id, insts in release_sets(observed, release).items():
        if trusted is not None and deploy_id not in trusted:
            continue
        fronts = [i for i in insts if i.role == "front"]
        wks = [i for i in insts if i.role == "worker"]
        if len(fronts) != 1 or fronts[0].status != RUNNING or not fronts[0].port:
            continue
        if any(w.status != RUNNING for w in wks):
            continue
        if workers is not None and len(wks) != workers:
            continue
        is_live = live is not None and fronts[0].id == live.id
        candidates.append((is_live, fronts[0].created_at, deploy_id, fronts[0], wks))
    if not candidates:
        return None
    candidates.sort(key=lambda c: (c[0], c[1], c[2]), reverse=True)
    _, _, _, front, wks = candidates[0]
    return front, sorted(wks, key=lambda w: w.name)


def _pick_release(observed: Deployment, wanted: str | None) -> tuple[Release, str | None]:
    """The release to deploy and, when it was chosen by default, a note naming it (I5)."""
    if wanted is None:
        baked = [r for r in observed.releases if r.is_baked_release]
        if not baked:
            others = ", ".join(f"{r.release} ({r.provenance or 'no provenance'})"
                               for r in observed.releases[:3])
            raise PlanError("no image baked from a real release exists"
                            + (f" (only {others})" if others else "")
                            + f": {BAKE_HINT}, or name one with --release")
        rel = baked[0]  # releases are newest first
        return rel, f"release {rel.release} (newest baked release, built {rel.built_at or '?'})"
    if not observed.releases:
        raise PlanError(f"no modelserve image exists: {BAKE_HINT}")
    rel = observed.release(wanted)
    if rel is None:
        have = ", ".join(r.release for r in observed.releases[:5])
        raise PlanError(f"no image for release {wanted!r} (newest: {have}); "
                        f"bake it with `make image RELEASE={wanted}`")
    return rel, None


def accuracy_floor(target: Release, req: DeployRequest) -> tuple[float, str]:
    """The quality floor that applies to ``target`` and where it comes from."""
    if req.min_accuracy is not None:
        return req.min_accuracy, "--min-accuracy"
    if target.accuracy_floor is not None:
        return target.accuracy_floor, "the image's modelserve_accuracy_floor"
    return DEFAULT_ACCURACY_FLOOR, "the default floor"


def _quality_floor(target: Release, req: DeployRequest) -> str | None:
    """Invariant I4: refuse a release below the absolute floor (or of unknown accuracy),
    live release or not; ``force`` overrides. The returned note says which floor applied
    and, when forced, that it was overridden."""
    floor, source = accuracy_floor(target, req)
    acc = target.model_accuracy
    if acc is not None and acc >= floor:
        return f"quality floor {floor:.4f} ({source}): {target.release} has {acc:.4f}"
    why = (f"release {target.release} has no known held-out accuracy" if acc is None else
           f"release {target.release} has held-out accuracy {acc:.4f}, below the quality floor "
           f"{floor:.4f} ({source})")
    if req.force:
        return f"quality floor overridden (--force): {why}"
    raise PlanError(f"{why}; deploy a better release, lower the floor with --min-accuracy, or "
                    "deploy anyway with --force (recorded in history)")


def _accuracy_gate(observed: Deployment, target: Release, req: DeployRequest) -> str | None:
    live = observed.live
    live_rel = observed.release(live) if live else None
    if live_rel is None or live_rel.model_accuracy is None or target.model_accuracy is None:
        return "accuracy gate skipped: no accuracy known for the live release" if live else None
    drop = live_rel.model_accuracy - target.model_accuracy
    if drop > req.accuracy_tolerance:
        if req.force:
            return (f"accuracy gate overridden (--force): {target.model_accuracy:.4f} < live "
                    f"{live_rel.model_accuracy:.4f}")
        raise PlanError(
            f"release {target.release} has held-out accuracy {target.model_accuracy:.4f}, "
            f"{drop:.4f} below live {live_rel.release} ({live_rel.model_accuracy:.4f}; "
            f"tolerance {req.accuracy_tolerance}); deploy anyway with --force")
    return None


def _retire(observed: Deployment, keep_first: list[str], keep: int) -> list[Step]:
    """Retire steps for releases beyond ``keep`` (ordered: keep_first, then newest images)."""
    with_instances = []
    for inst in observed.instances:
        if inst.release not in with_instances:
            with_instances.append(inst.release)
    order = list(dict.fromkeys(r for r in keep_first if r))
    built = {r.release: r.built_at for r in observed.releases}
    rest = sorted((r for r in with_instances if r not in order),
                  key=lambda r: (built.get(r, ""), r), reverse=True)
    order += rest
    steps: list[Step] = []
    for rel in order[keep:]:
        names = tuple(sorted(i.name for i in observed.instances_of(rel)))
        if names:
            steps.append(Retire(rel, names))
    return steps


def _diff_gate(observed: Deployment, release: str, front: str, req: DeployRequest,
               notes: list[str]) -> list[Step]:
    """The model-diff gate, when a release is live (its front answers the comparison)."""
    live_inst = observed.live_instance
    if not observed.live:
        notes.append("model-diff gate skipped: nothing is live to compare with")
        return []
    if live_inst is None or live_inst.role != "front":
        notes.append(f"model-diff gate skipped: the live front of {observed.live} is not "
                     "visible")
        return []
    return [DiffGate(release, front, observed.live, live_inst.name, req.max_disagreement,
                     req.force, tuple(req.diff_sample))]


# -- the planners --------------------------------------------------------------------------
def plan_deploy(observed: Deployment, req: DeployRequest) -> Plan:
    """The steps that make ``req.release`` (default: the newest baked release) live.

    Invariants: I4 (quality floor, even with nothing live), I5 (the default is the newest
    image with provenance ``release``, named in the notes), I1 (no instance of the live or
    recorded previous release is deleted), I11 (only a warm set of a run known to have
    finished is reused, under the full gate; a dead run's set of the target is replaced).
    """
    if req.keep < 2:
        raise PlanError("--keep must be at least 2 (the live release and the rollback target)")
    if req.workers < 0:
        raise PlanError("--workers must be >= 0")
    if req.min_accuracy is not None and not 0.0 <= req.min_accuracy <= 1.0:
        raise PlanError("--min-accuracy must be between 0 and 1")
    if not 0.0 <= req.max_disagreement <= 1.0:
        raise PlanError("--max-disagreement must be between 0 and 1")
    pending = observed.preview
    if pending and not req.promote:
        raise PlanError(pending_preview_text(req.env, pending.release, pending.deploy_id))
    target, picked = _pick_release(observed, req.release)
    live = observed.live
    notes: list[str] = [picked] if picked else []
    steps: list[Step] = []
    if observed.fip is None:
        steps.append(CreateFloatingIP(req.env))
    if live == target.release:
        return Plan("deploy", target.release, tuple(steps), tuple(notes + [
            f"release {target.release} is already live in {req.env}: nothing to do"]))
    for note in (_quality_floor(target, req), _accuracy_gate(observed, target, req)):
        if note:
            notes.append(note)

    spared = observed.spared()
    warm = None
    if req.reuse_warm:
        warm = warm_set(observed, target.release, req.workers, observed.known_deploy_ids)
    if warm:
        front, workers = warm
        front_name, worker_names = front.name, tuple(w.name for w in workers)
        notes.append(f"reusing the warm instances of {target.release} (deploy {front.deploy_id}),"
                     " gated with the full health-gate budget")
        stale = [i.name for i in observed.instances_of(target.release)
                 if i.deploy_id != front.deploy_id]
    else:
        stale = [i.name for i in observed.instances_of(target.release)]
    kept = sorted(n for n in stale if n in spared)
    stale = sorted(n for n in stale if n not in spared)
    if kept:
        notes.append(f"keeping {', '.join(kept)}: instances of the rollback target are never "
                     "deleted by a deploy (cleanup removes them once they are neither live nor "
                     "previous)")
    if stale:
        steps.append(DeleteInstances(tuple(stale), "incomplete or stale set"))
    if not warm:
        live_inst = observed.live_instance
        colour = other_colour(live_inst.colour if live_inst else None)
        front_name = instance_name(req.env, target.release, "front", 0, req.deploy_id)
        worker_names = tuple(instance_name(req.env, target.release, "worker", i + 1,
                                           req.deploy_id) for i in range(req.workers))
        steps.append(LaunchFront(front_name, target.release, colour,
                                 "0.0.0.0" if req.workers else "127.0.0.1"))
        if worker_names:
            steps.append(LaunchWorkers(worker_names, target.release, colour, front_name))
    steps.append(HealthGate(target.release, front_name, worker_names, target.model_sha256,
                            full=True, reused=bool(warm)))
    steps += _diff_gate(observed, target.release, front_name, req, notes)
    if req.preview:  # served on the preview address; promote switches and retires
        steps.append(StartPreview(target.release, front_name,
                                  warm[0].deploy_id if warm else req.deploy_id))
        return Plan("preview", target.release, tuple(steps), tuple(notes))
    previous = live or (observed.previous if observed.previous != target.release else None)
    steps.append(Switch(target.release, front_name, live, previous))
    steps.append(Verify(target.release))
    steps += _retire(observed, [target.release, live or "", previous or ""], req.keep)
    return Plan("deploy", target.release, tuple(steps), tuple(notes))


def pending_preview_text(env: str, release: str, deploy_id: str) -> str:
    """The refusal of a deploy while a preview is pending (one line, with the way out)."""
    return (f"env {env} has a pending preview of release {release} (deploy {deploy_id}): "
            f"promote it (python -m rollout promote --env {env}) or abort it "
            f"(python -m rollout abort --env {env}) before deploying")


def plan_promote(observed: Deployment, req: PromoteRequest) -> Plan:
    """Switch to the pending preview's own set: the deploy plan of its release, which must
    reuse exactly that set (gate, switch, verify, analysis), then end the preview, then retire
    releases beyond ``keep``. The preview's set gone or stopped: refused (abort, preview
    again)."""
    pv = observed.preview
    if pv is None:
        raise PlanError(f"env {req.env} has no pending preview: start one with python -m "
                        f"rollout deploy --env {req.env} --preview")
    pset = observed.preview_set()
    fronts = [i for i in pset if i.role == "front"]
    workers = [i for i in pset if i.role == "worker"]
    if len(fronts) != 1 or any(i.status != RUNNING for i in pset):
        raise PlanError(
            f"the preview of {pv.release} (deploy {pv.deploy_id}) has no complete running set "
            f"({', '.join(f'{i.name} {i.status}' for i in pset) or 'no instances'}): abort it "
            f"(python -m rollout abort --env {req.env}) and preview again")
    plan = plan_deploy(observed, DeployRequest(
        req.env, req.deploy_id, release=pv.release, workers=len(workers), keep=req.keep,
        force=req.force, accuracy_tolerance=req.accuracy_tolerance,
        min_accuracy=req.min_accuracy, promote=True))
    end = EndPreview(pv.release, "promoted")
    if not plan.steps or all(isinstance(s, CreateFloatingIP) for s in plan.steps):
        return Plan("promote", pv.release, (end,), plan.notes)  # already live (a rollback)
    gate = next((s for s in plan.steps if isinstance(s, HealthGate)), None)
    if gate is None or gate.front != fronts[0].name or any(
            isinstance(s, LaunchFront | LaunchWorkers) for s in plan.steps):
        raise PlanError(f"the preview's set of {pv.release} (deploy {pv.deploy_id}) cannot be "
                        f"reused: abort it (python -m rollout abort --env {req.env}) and "
                        "preview again")
    steps = list(plan.steps)
    at = next(n for n, s in enumerate(steps) if isinstance(s, Verify)) + 1
    steps.insert(at, end)  # after the analysis (run at the end of verify), before retiring
    return Plan("promote", pv.release, tuple(steps), plan.notes)


def plan_abort(observed: Deployment, req: AbortRequest) -> Plan:
    """End the pending preview, then delete its set (never an instance of the live or
    recorded previous release: a preview that reused such a set only ends)."""
    pv = observed.preview
    if pv is None:
        raise PlanError(f"env {req.env} has no pending preview to abort")
    spared = observed.spared(preview=False)
    pset = sorted(i.name for i in observed.preview_set())
    kept = [n for n in pset if n in spared]
    names = tuple(n for n in pset if n not in spared)
    steps: list[Step] = [EndPreview(pv.release, "aborted")]
    if names:
        steps.append(DeleteInstances(names, f"aborted preview of {pv.release}"))
    notes = [f"keeping {', '.join(kept)}: live or previous release"] if kept else []
    return Plan("abort", pv.release, tuple(steps), tuple(notes))


def plan_rollback(observed: Deployment, req: RollbackRequest) -> Plan:
    """The steps that point the floating IP back at the previous (or named) release."""
    live = observed.live
    if observed.fip is None or live is None:
        raise PlanError(f"nothing is live in env {req.env}: deploy first")
    target = req.to or observed.previous
    if not target:
        raise PlanError(f"env {req.env} has no previous release to roll back to")
    if target == live:
        raise PlanError(f"release {target} is already live in {req.env}")
    warm = (warm_set(observed, target, trusted=observed.known_deploy_ids)
            or warm_set(observed, target))
    if warm is None:
        raise PlanError(
            f"release {target} has no healthy running instances in {req.env} to roll back to "
            f"(retired, stopped or deleted); redeploy it: python -m rollout deploy --env "
            f"{req.env} --release {target}")
    front, workers = warm
    sha = front.model_sha256
    rel = observed.release(target)
    if rel is not None:
        sha = rel.model_sha256
    steps: list[Step] = [
        HealthGate(target, front.name, tuple(w.name for w in workers), sha, full=False),
        Switch(target, front.name, live, live),
        Verify(target),
    ]
    return Plan("rollback", target, tuple(steps))


def plan_cleanup(observed: Deployment, req: CleanupRequest) -> Plan:
    """Delete leftovers of failed/interrupted runs and releases beyond ``--keep``.

    Invariant I1: never deletes an instance of the live release or of the recorded previous
    release, whatever its status (a dead run's own instances, ``dead_deploy_id``, excepted
    unless they are the live set). A floating IP whose target is no visible instance makes
    it refuse: what is live cannot be known. Also spares the instances of a deploy that holds
    the lock (``active_deploy_id``; empty when the lock was broken). A complete running set
    of another release is kept warm only if its run is known to have finished (I11).
    """
    if req.keep < 2:
        raise PlanError("--keep must be at least 2 (the live release and the rollback target)")
    if observed.target_missing:
        fip = observed.fip
        raise PlanError(
            f"the floating IP of env {req.env} points at {fip.target if fip else '?'}, which "
            "is no visible instance, so what is live cannot be known: cleanup refuses to "
            f"delete anything; redeploy (python -m rollout deploy --env {req.env} --release R) "
            "or check the instances with `python -m rollout status`")
    live_inst = observed.live_instance
    live = observed.live
    previous = observed.previous if observed.previous != live else None
    protected: set[str] = set(observed.spared(req.dead_deploy_id))  # instance names
    trusted = observed.known_deploy_ids - ({req.dead_deploy_id} - (
        {live_inst.deploy_id} if live_inst else set()))
    keep_sets: dict[str, str] = {}  # release -> deploy id of its canonical set
    if live_inst:
        keep_sets[live_inst.release] = live_inst.deploy_id
    for rel in {i.release for i in observed.instances} - set(keep_sets):
        warm = warm_set(observed, rel, trusted=trusted)
        if warm:
            keep_sets[rel] = warm[0].deploy_id
    for inst in observed.instances:
        if keep_sets.get(inst.release) == inst.deploy_id:
            protected.add(inst.name)
        if req.active_deploy_id and inst.deploy_id == req.active_deploy_id:
            protected.add(inst.name)
    steps: list[Step] = []
    orphans = sorted(i.name for i in observed.instances if i.name not in protected)
    if orphans:
        dead = {i.name for i in observed.instances
                if req.dead_deploy_id and i.deploy_id == req.dead_deploy_id} & set(orphans)
        reason = ("left by a failed or interrupted run" if not dead else
                  f"left by the dead run {req.dead_deploy_id}" if len(dead) == len(orphans) else
                  f"left by the dead run {req.dead_deploy_id} and other failed or interrupted "
                  "runs")
        steps.append(DeleteInstances(tuple(orphans), reason))
    # releases beyond keep (only complete sets remain at this point)
    previewed = {i.name for i in observed.preview_set()}  # abort's to end, not cleanup's
    remaining = Deployment(observed.env, observed.fip, observed.releases,
                           tuple(i for i in observed.instances if i.name in protected
                                 and i.name not in previewed
                                 and not (req.active_deploy_id
                                          and i.deploy_id == req.active_deploy_id)))
    steps += _retire(remaining, [live or "", previous or "",
                                 (observed.fip.state.live if observed.fip else "")], req.keep)
    if req.images:
        used = {i.release for i in observed.instances} | set(req.in_use_elsewhere)
        used |= {r for r in (live, previous) if r}
        for rel in observed.releases[req.keep:]:
            retired = {s.release for s in steps if isinstance(s, Retire)}
            if rel.release in used and rel.release not in retired:
                continue
            if rel.release in (live, previous) or rel.release in req.in_use_elsewhere:
                continue
            steps.append(DeleteImage(rel.release, rel.name))
    return Plan("cleanup", None, tuple(steps))


def check_spared(observed: Deployment, plan: Plan, dead_deploy_id: str = "") -> None:
    """Raise PlanError if ``plan`` would delete an instance I1 spares (a last guard the
    executor can run before applying any plan; every planner here already obeys it).
    Retire steps of a deploy run after its switch and are checked against the release it
    makes previous, not the one recorded now. Only ``abort`` may delete the preview's set."""
    spared = observed.spared(dead_deploy_id, preview=plan.action != "abort")
    after_switch = False
    for step in plan.steps:
        if isinstance(step, Switch):
            after_switch = True
            spared = frozenset(i.name for i in observed.instances
                               if i.release in (step.release, step.previous))
        names = step.instances if isinstance(step, DeleteInstances | Retire) else ()
        bad = sorted(set(names) & spared)
        if bad:
            when = "after the switch" if after_switch else "now"
            raise PlanError(f"refusing a plan that deletes {', '.join(bad)}: live or previous "
                            f"release {when} (invariant I1); this is a bug, please report it")
