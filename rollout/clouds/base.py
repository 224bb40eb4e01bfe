"""The ``Cloud`` protocol and the frozen facts the rollout tool observes.

Two implementations: ``clouds/lxd.py`` (the local default) and ``clouds/openstack.py``. Only
those modules import their SDK; everything else (planner, executor, CLI, tests) speaks this
protocol.

Verb grammar (openstacksdk's):
  ``find_*``      returns the resource or None;
  ``get_*``       returns the resource or raises ``NotFound``;
  ``list_*``      returns a (possibly empty) list, newest first where it says so;
  ``create_*``    starts creating and returns at once (the resource may still be building);
  ``wait_for_*``  polls ``get_*`` until the wanted state, raising ``WaitTimeout`` (time is up),
                  ``CloudError`` (the resource went to ERROR: permanent);
  ``delete_*``    deletes; with ``ignore_missing=True`` (the default) a missing resource is not
                  an error. Deletes do not wait unless they say so.
Errors: implementations raise only ``rollout.errors`` classes: ``TransientCloudError`` for what
is worth retrying (timeouts, HTTP 5xx, connection errors, 409 "busy"), ``Conflict`` when a
compare-and-swap loses, ``NotFound``, and ``CloudError`` for anything permanent. Retrying is
the caller's job (rollout/retry.py): implementations make ONE attempt per call.

Where the state lives (no local state file; any operator on any machine sees the same truth):

* Release = an image carrying the property ``modelserve_release`` (set at bake time, with
  ``modelserve_git_sha``, ``modelserve_app_version``, ``modelserve_model_sha256``,
  ``modelserve_model_accuracy``, ``modelserve_built_at``). LXD: image properties, alias
  ``modelserve-<release>``. OpenStack: Glance image properties, name ``modelserve-<release>``.
* Instance = a container/server carrying labels ``INSTANCE_LABELS`` (all strings).
  LXD: instance config keys ``user.modelserve.<label>``. OpenStack: Nova server metadata
  ``modelserve_<label>`` plus the tags ``modelserve`` and ``modelserve-env-<env>`` so that
  listing by environment is one filtered call.
* FloatingIP = one per environment, the address users hit. LXD: a network forward on the
  managed bridge (``listen_address`` = the floating address, default ``target_address`` = the
  live front's IPv4). OpenStack: a Neutron floating IP, ``port_id`` = the live front's port.
  It also carries the environment's small mutable state, ``FipState`` (live release, previous
  release = rollback target, lock). LXD keeps it in forward config keys
  ``user.modelserve.<field>``; OpenStack in the floating IP's ``description`` as compact JSON
  (``FipState.encode()``, < 255 chars) plus the tag ``modelserve-env-<env>``.
  Every change of target and/or state is ONE full update guarded by ``if_revision``
  (LXD: ETag / If-Match on PUT; Neutron: ``update_ip(..., if_revision=revision_number)``), so
  two operators can never both win. The target is never removed and re-added (a switch is one
  update: requests in flight keep flowing; see docs/design.md).
* History = short events (``HistoryEvent``) appended best-effort after a switch; LXD keeps the
  last ``HISTORY_KEEP`` in the forward config key ``user.modelserve.history`` (JSON list),
  OpenStack as floating-IP tags ``h:<encoded event>`` (oldest dropped beyond the limit).

The lock: ``FipState.lock`` is taken by a CAS update of the floating IP (lock empty -> ours)
before a deploy/rollback observes the world, renewed (its lease, ``Lock.expires``) before
every step, and released by a CAS update at the end (``rollout/lock.py``). A second deploy
sees it set and fails fast with ``DeployLocked`` (holder, since, deploy id), unless the
holder is provably dead (same host, pid gone) or its lease expired; otherwise breaking it is
explicit (``cleanup --break-lock``). Encoded ``holder|since|deploy_id|expires``.
LXD note: LXD 5.0 ignores If-Match on network forwards, so lxd.py makes the compare-and-swap
real with a short-lived mutex (creating a profile is atomic: a second create gets 409).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

from rollout.errors import NotFound, WaitTimeout  # noqa: F401  (re-exported for implementers)

#: Labels every instance launched by rollout carries (values are short strings).
INSTANCE_LABELS = ("env", "release", "colour", "role", "deploy_id", "created_at", "model_sha256")
#: Image properties a release carries (``modelserve_`` prefix on the cloud).
RELEASE_PROPERTIES = (
    "release",
    "git_sha",
    "app_version",
    "model_sha256",
    "model_accuracy",
    "built_at",
)
HISTORY_KEEP = 20
APP_PORT = 8080
#: ``modelserve_provenance`` of an image baked from a real release (stand-ins say "standin").
PROVENANCE_RELEASE = "release"

# Instance status, normalised by every implementation.
RUNNING = "RUNNING"  # booted and has an address (LXD Running + IPv4; Nova ACTIVE)
BUILDING = "BUILDING"  # being created/started, no address yet
STOPPED = "STOPPED"  # exists but not running (LXD Stopped; Nova SHUTOFF)
ERROR = "ERROR"  # failed permanently (Nova ERROR; LXD Error)


@dataclass(frozen=True)
class Release:
    """One baked image of the app: what a deploy launches."""

    id: str  # LXD image fingerprint / Glance image id
    name: str  # modelserve-<release> (LXD alias / Glance name)
    release: str  # modelserve_release
    model_sha256: str
    model_accuracy: float | None = None
    git_sha: str = ""
    app_version: str = ""
    built_at: str = ""  # ISO-8601 UTC; newest-first ordering uses it (then name)
    provenance: str = ""  # modelserve_provenance: "release" (packer/bake.py) | "standin" | ""
    accuracy_floor: float | None = None  # modelserve_accuracy_floor: the bundle's quality floor

    @property
    def is_baked_release(self) -> bool:
        """True for an image packer/bake.py baked from a real release (never a stand-in)."""
        return self.provenance == PROVENANCE_RELEASE

    @classmethod
    def from_properties(cls, id: str, name: str, props: Mapping[str, object],
                        created_at: str = "") -> Release | None:
        """A Release from image properties (``modelserve_`` prefix), or None when the image
        carries no ``modelserve_release``. Numbers that do not parse become None."""
        def val(key: str) -> str:
            v = props.get(f"modelserve_{key}")
            return "" if v is None else str(v)

        def num(key: str) -> float | None:
            try:
                return float(val(key)) if val(key) else None
            except ValueError:
                return None

        if not val("release"):
            return None
        return cls(id=id, name=name or f"modelserve-{val('release')}", release=val("release"),
                   model_sha256=val("model_sha256"), model_accuracy=num("model_accuracy"),
                   git_sha=val("git_sha"), app_version=val("app_version"),
                   built_at=val("built_at") or created_at, provenance=val("provenance"),
                   accuracy_floor=num("accuracy_floor"))


@dataclass(frozen=True)
class Instance:
    """One server launched from a release, with the labels rollout put on it."""

    id: str  # LXD instance name / Nova server id (what get_/delete_instance take)
    name: str  # ms-<env>-<release>-<role><n>-<deploy6>
    env: str
    release: str
    colour: str  # blue | green
    role: str  # front | worker
    deploy_id: str
    status: str  # RUNNING | BUILDING | STOPPED | ERROR
    address: str | None = None  # fixed IPv4 the operator's machine can reach (health gate)
    port: str | None = None  # what a FloatingIP targets: Neutron port id / LXD IPv4
    created_at: str = ""  # ISO-8601 UTC, from the label
    model_sha256: str = ""  # from the label: the gate still works if the image is deleted
    fault: str = ""  # the cloud's error text when status is ERROR


@dataclass(frozen=True)
class Lock:
    """Who holds an environment's deploy lock, and until when (a lease the run renews)."""

    holder: str  # user@host:pid
    since: str  # ISO-8601 UTC
    deploy_id: str
    expires: str = ""  # ISO-8601 UTC end of the lease ("" for locks written before leases)

    @property
    def host(self) -> str:
        """The host part of ``holder`` ("" if it does not parse)."""
        return self.holder.rpartition("@")[2].rpartition(":")[0]

    @property
    def pid(self) -> int | None:
        """The pid part of ``holder`` (None if it does not parse)."""
        tail = self.holder.rpartition(":")[2]
        return int(tail) if tail.isdigit() else None

    def encode(self) -> str:
        """``holder|since|deploy_id|expires`` (the trailing field only when set)."""
        parts = [self.holder, self.since, self.deploy_id]
        if self.expires:
            parts.append(self.expires)
        return "|".join(parts)

    @classmethod
    def decode(cls, text: str) -> Lock:
        """Inverse of ``encode``; accepts the 3-field form written before leases."""
        holder, since, deploy_id, expires = (str(text).split("|") + ["", "", "", ""])[:4]
        return cls(holder, since, deploy_id, expires)


@dataclass(frozen=True)
class Preview:
    """A release launched and gated by ``deploy --preview`` and not yet promoted or aborted:
    its set (``deploy_id``) is served on the env's preview address, and no deploy may start
    until it is promoted or aborted. Encoded ``release|deploy_id`` (Neutron's description,
    which holds the whole ``FipState``, is 255 characters at most)."""

    release: str
    deploy_id: str

    def encode(self) -> str:
        return f"{self.release}|{self.deploy_id}"

    @classmethod
    def decode(cls, text: str) -> Preview | None:
        """Inverse of ``encode``; None for an empty or unparsable value."""
        release, _, deploy_id = str(text).partition("|")
        return cls(release, deploy_id) if release and deploy_id else None


def preview_env(env: str) -> str:
    """The key of an env's preview floating IP: ``<env>.preview`` ('.' is never part of an
    env name, so no env's own floating IP can be taken for a preview one)."""
    return f"{env}.preview"


@dataclass(frozen=True)
class FipState:
    """The environment's mutable state, stored on its floating IP (see module doc)."""

    live: str = ""  # release the floating IP serves (informational; target is the truth)
    previous: str = ""  # rollback target
    lock: Lock | None = None
    preview: Preview | None = None  # a pending preview (deploy --preview), until promote/abort

    def encode(self) -> str:
        """Compact JSON (< 255 chars for sane ids) for clouds that keep it in one string."""
        d: dict[str, str] = {}
        if self.live:
            d["l"] = self.live
        if self.previous:
            d["p"] = self.previous
        if self.lock:
            d["k"] = self.lock.encode()
        if self.preview:
            d["v"] = self.preview.encode()
        return json.dumps(d, separators=(",", ":"), sort_keys=True)

    @classmethod
    def decode(cls, text: str | None) -> FipState:
        """Inverse of ``encode``; empty/garbage text decodes to the empty state."""
        try:
            d = json.loads(text or "{}")
        except ValueError:
            return cls()
        if not isinstance(d, dict):
            return cls()
        lock = None
        if d.get("k"):
            lock = Lock.decode(str(d["k"]))
        return cls(live=str(d.get("l", "")), previous=str(d.get("p", "")), lock=lock,
                   preview=Preview.decode(str(d.get("v") or "")))


@dataclass(frozen=True)
class HistoryEvent:
    """One switch of the floating IP (deploy or rollback), newest last in lists."""

    at: str  # ISO-8601 UTC
    action: str  # deploy | deploy-forced | rollback | analysis_failed
    release: str  # the release switched to
    from_release: str = ""
    deploy_id: str = ""
    detail: str = ""  # e.g. the post-switch analysis figures (no ';'); "" for older events

    def encode(self) -> str:
        """``at;action;release;from;deploy_id[;detail]`` — short enough for a Neutron tag."""
        parts = [self.at, self.action, self.release, self.from_release, self.deploy_id]
        if self.detail:
            parts.append(self.detail.replace(";", ","))
        return ";".join(parts)

    @classmethod
    def decode(cls, text: str) -> HistoryEvent:
        """Inverse of ``encode`` (events written before ``detail`` decode with it empty)."""
        parts = (text.split(";", 5) + [""] * 6)[:6]
        return cls(*parts)


@dataclass(frozen=True)
class FloatingIP:
    """The per-environment address users hit, and the state stored on it."""

    id: str  # LXD: the listen address; Neutron: floating IP id
    address: str  # the address users hit
    env: str
    target: str | None  # the port it points at (Instance.port) or None when unassigned
    revision: str  # opaque CAS token: LXD ETag / Neutron revision_number as str
    state: FipState = field(default_factory=FipState)
    history: tuple[HistoryEvent, ...] = ()


@dataclass(frozen=True)
class InstanceSpec:
    """What ``create_instance`` needs: everything is decided by the executor beforehand."""

    name: str
    release: Release
    labels: Mapping[str, str]  # exactly INSTANCE_LABELS
    user_data: str  # the rendered #cloud-config (rollout/seed.py); plain text, not base64
    flavor: str = ""  # OpenStack flavor name; LXD: ignored (limits come from the profile)
    #: the fixed address ``pick_addresses`` chose for it (its seed may name it: the front's
    #: certificate, the front's broker peers); None: the cloud picks one
    address: str | None = None


@dataclass(frozen=True)
class Deployment:
    """Everything observed about one environment: the planner's only input from the cloud."""

    env: str
    fip: FloatingIP | None
    releases: tuple[Release, ...]  # all images, newest first
    instances: tuple[Instance, ...]  # this env's instances

    @property
    def live_instance(self) -> Instance | None:
        """The front the floating IP points at, if any, whatever its status (a stopped live
        front is still the live front). The target is an identity (``Instance.port``: the
        instance name on LXD, the port id on OpenStack); an instance whose port is not known
        right now (stopped) is matched by its name or id, never by an address."""
        if not self.fip or not self.fip.target:
            return None
        target = self.fip.target
        return (next((i for i in self.instances if i.port and i.port == target), None)
                or next((i for i in self.instances if target in (i.name, i.id)), None))

    @property
    def target_missing(self) -> bool:
        """The floating IP names a target that is no visible instance of this env."""
        return bool(self.fip and self.fip.target) and self.live_instance is None

    @property
    def live_condition(self) -> str:
        """For status views: "" (nothing live), "running", "stopped", "building", "error",
        or "missing" (the floating IP's target is no visible instance). Never hides a
        stopped live release as "no live release"."""
        if self.target_missing:
            return "missing"
        inst = self.live_instance
        return inst.status.lower() if inst else ""

    def describe_live(self) -> str:
        """One phrase for status views: "r2 (live)", "r2 (live, stopped)", "-", or what the
        floating IP points at when that is no visible instance."""
        cond = self.live_condition
        if cond == "missing":
            state = self.fip.state.live if self.fip else ""
            return (f"{state or '?'} (floating IP target {self.fip.target if self.fip else '?'} "
                    "is no visible instance)")
        if not cond:
            return "-"
        return f"{self.live} (live)" if cond == "running" else f"{self.live} (live, {cond})"

    @property
    def live(self) -> str | None:
        """The release that serves traffic now (from the floating IP's real target)."""
        inst = self.live_instance
        return inst.release if inst else None

    @property
    def previous(self) -> str | None:
        """The rollback target recorded on the floating IP."""
        return (self.fip.state.previous or None) if self.fip else None

    @property
    def preview(self) -> Preview | None:
        """The env's pending preview, if any."""
        return self.fip.state.preview if self.fip else None

    def preview_set(self) -> tuple[Instance, ...]:
        """The instances of the pending preview (its release and deploy id)."""
        pv = self.preview
        return tuple(i for i in self.instances
                     if pv and i.release == pv.release and i.deploy_id == pv.deploy_id)

    @property
    def known_deploy_ids(self) -> frozenset[str]:
        """Deploy ids of runs known to have finished a switch: the live front's and every
        one recorded in history, plus the previous release's when it has exactly one set.
        A set whose deploy id is not among them is a dead (or running) run's leftovers."""
        ids = {e.deploy_id for e in (self.fip.history if self.fip else ()) if e.deploy_id}
        inst = self.live_instance
        if inst:
            ids.add(inst.deploy_id)
        if self.previous:
            prev_ids = {i.deploy_id for i in self.instances_of(self.previous)}
            if len(prev_ids) == 1:
                ids |= prev_ids
        if self.preview:
            ids.add(self.preview.deploy_id)  # a finished preview run: its set is no leftover
        return frozenset(ids)

    def spared(self, dead_deploy_id: str = "", *, preview: bool = True) -> frozenset[str]:
        """Names of the instances no cleanup/destroy-like step may delete (invariant I1):
        every instance of the live release and of the recorded previous release, whatever its
        status, and (unless ``preview=False``: ``abort``) the pending preview's set. The one
        exception is a dead run's own instances (``dead_deploy_id``, the deploy id of a lock
        that was broken) that are not the live front's set."""
        releases = {r for r in (self.live, self.previous) if r}
        if self.fip and self.fip.state.live:
            releases.add(self.fip.state.live)
        inst = self.live_instance
        live_set = (inst.release, inst.deploy_id) if inst else None
        out = set()
        for i in self.instances:
            if i.release not in releases:
                continue
            if dead_deploy_id and i.deploy_id == dead_deploy_id \
                    and (i.release, i.deploy_id) != live_set:
                continue
            out.add(i.name)
        if inst:
            out.add(inst.name)
        if preview:
            out |= {i.name for i in self.preview_set()}
        return frozenset(out)

    def release(self, name: str) -> Release | None:
        """The image for a release name, if it exists."""
        return next((r for r in self.releases if r.release == name), None)

    def instances_of(self, release: str) -> tuple[Instance, ...]:
        """This env's instances of one release."""
        return tuple(i for i in self.instances if i.release == release)

    def with_fip(self, fip: FloatingIP | None) -> Deployment:
        """A copy with another floating IP (used by the executor after a switch)."""
        return replace(self, fip=fip)


@runtime_checkable
class Cloud(Protocol):
    """What rollout needs from a cloud. One attempt per call; see the module doc."""

    name: str  # "lxd" | "openstack"

    # -- releases (images) -------------------------------------------------------------
    def list_releases(self) -> list[Release]:
        """Every image with a ``modelserve_release`` property, newest (built_at) first."""

    def find_release(self, release: str) -> Release | None:
        """The image whose ``modelserve_release`` equals ``release``, or None."""

    def delete_release(self, release: Release, *, ignore_missing: bool = True) -> None:
        """Delete the image (never called for the live release or the rollback target)."""

    # -- instances ----------------------------------------------------------------------
    def list_instances(self, env: str | None) -> list[Instance]:
        """Every rollout instance labelled with ``env`` (None: of every env), any status,
        oldest first."""

    def find_instance(self, instance_id: str) -> Instance | None:
        """One instance by id, or None."""

    def get_instance(self, instance_id: str) -> Instance:
        """One instance by id, or ``NotFound``."""

    def create_instance(self, spec: InstanceSpec) -> Instance:
        """Create and start an instance from ``spec.release`` with ``spec.user_data`` as its
        NoCloud user-data and ``spec.labels`` as its labels. Returns at once (BUILDING is
        fine); on failure removes whatever it half-created before raising."""

    def wait_for_instance(self, instance_id: str, *, timeout: float) -> Instance:
        """Poll until RUNNING with an address; ``CloudError`` on ERROR, ``WaitTimeout``."""

    def pick_addresses(self, count: int) -> list[str] | None:
        """``count`` distinct free fixed addresses for instances about to be created (their
        ``InstanceSpec.address``), or None when this cloud assigns addresses itself at
        creation (then seeds cannot name them beforehand)."""

    def delete_instance(self, instance_id: str, *, ignore_missing: bool = True) -> None:
        """Stop (forcefully) and delete an instance."""

    # -- floating IP -----------------------------------------------------------------------
    def find_floating_ip(self, env: str) -> FloatingIP | None:
        """The environment's floating IP, or None."""

    def create_floating_ip(self, env: str, address: str | None = None) -> FloatingIP:
        """Allocate the environment's floating IP (unassigned, empty state). ``address``
        picks it where the cloud allows; None = the cloud's choice/default for ``env``."""

    def update_floating_ip(
        self,
        fip: FloatingIP,
        *,
        target: str | None,
        state: FipState,
        if_revision: str,
    ) -> FloatingIP:
        """ONE full update of target + state, only if the revision is still
        ``if_revision``; else ``Conflict``. ``target`` None keeps it unassigned. Returns the
        new FloatingIP (new revision)."""

    def record_event(self, fip: FloatingIP, event: HistoryEvent) -> None:
        """Append a history event (best effort, not CAS-guarded; keeps HISTORY_KEEP)."""

    def delete_floating_ip(self, fip: FloatingIP, *, ignore_missing: bool = True) -> None:
        """Release the environment's floating IP."""


def by_newest(releases: Sequence[Release]) -> list[Release]:
    """Releases sorted newest first (built_at, then name) — the order ``list_releases`` uses."""
    return sorted(releases, key=lambda r: (r.built_at, r.name), reverse=True)


class CloudBase:
    """Shared behaviour for implementations: ``wait_for_instance`` from ``get_instance``.

    Subclasses set ``self.sleep`` (tests inject a no-op) and implement the rest of ``Cloud``.
    """

    sleep = staticmethod(time.sleep)

    def pick_addresses(self, count: int) -> list[str] | None:
        """Addresses are the cloud's choice at creation unless an implementation says."""
        return None

    def find_instance(self, instance_id: str) -> Instance | None:
        """``get_instance``, or None where it raises NotFound."""
        try:
            return self.get_instance(instance_id)  # type: ignore[attr-defined]
        except NotFound:
            return None

    def wait_for_instance(self, instance_id: str, *, timeout: float) -> Instance:
        """Poll ``get_instance`` (INSTANCE_BOOT policy) until RUNNING with an address."""
        from rollout.retry import INSTANCE_BOOT

        return INSTANCE_BOOT.with_budget(timeout).run(
            lambda: booted(self.get_instance(instance_id)),  # type: ignore[attr-defined]
            sleep=self.sleep, what=f"waiting for instance {instance_id}"
        )


def booted(inst: Instance) -> Instance:
    """The predicate every ``wait_for_instance`` polls: ``inst`` when RUNNING with an address
    and a port; ``CloudError`` on ERROR (permanent); ``NotReady`` otherwise."""
    from rollout.errors import CloudError
    from rollout.retry import NotReady

    if inst.status == ERROR:
        raise CloudError(f"instance {inst.name} went to ERROR: {inst.fault or '?'}")
    if inst.status != RUNNING or not inst.address or not inst.port:
        raise NotReady(f"instance {inst.name} is {inst.status}, address={inst.address}")
    return inst
