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
    previous = live or (observed.previous if observed.previous != target.release else None)
    steps.append(Switch(target.release, front_name, live, previous))
    steps.append(Verify(target.release))
    steps += _retire(observed, [target.release, live or "", previous or ""], req.keep)
    return Plan("deploy", target.release, tuple(steps), tuple(notes))


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
    remaining = Deployment(observed.env, observed.fip, observed.releases,
                           tuple(i for i in observed.instances if i.name in protected
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
    makes previous, not the one recorded now."""
    spared = observed.spared(dead_deploy_id)
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
