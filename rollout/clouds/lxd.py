"""The local cloud: LXD (pylxd). The only module that talks to LXD.

Mapping (see base.py for the protocol):
* Release   = an LXD image with the property ``modelserve_release`` (alias ``modelserve-<r>``).
* Instance  = a system container (root disk on MODELSERVE_ROLLOUT_LXD_POOL, default the
  profile's pool); labels in config keys ``user.modelserve.<label>``; its
  NoCloud user-data in ``cloud-init.user-data`` (the base image's templates write it to
  /var/lib/cloud/seed/nocloud-net/ at create and start). ``port`` = its eth0 IPv4.
* FloatingIP = a network forward on the managed bridge (MODELSERVE_LXD_BRIDGE, msbr0):
  ``listen_address`` = the floating address, picked once per env from the /24 after the
  bridge's (MODELSERVE_LXD_FIP_PREFIX overrides, e.g. ``10.87.43``); its default
  ``target_address`` = the live front. State in config keys ``user.modelserve.{env,live,
  previous,lock,revision,history}``.
* Compare-and-swap: LXD 5.0 ignores If-Match on forwards, so ``update_floating_ip`` runs
  read-compare-write under a mutex that IS atomic in LXD: creating the profile
  ``modelserve-cas-<env>`` (a second create gets an error; a mutex older than
  ``CAS_STALE_S`` was left by a killed process and is broken). The write is one full PUT of
  the forward (never delete + re-add: that drops requests).
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import pylxd
import requests
from pylxd.exceptions import LXDAPIException
from pylxd.exceptions import NotFound as LXDNotFound

from rollout.clouds.base import (
    BUILDING,
    ERROR,
    HISTORY_KEEP,
    INSTANCE_LABELS,
    RELEASE_PROPERTIES,
    RUNNING,
    STOPPED,
    CloudBase,
    FipState,
    FloatingIP,
    HistoryEvent,
    Instance,
    InstanceSpec,
    Lock,
    Release,
    by_newest,
)
from rollout.errors import CloudError, Conflict, NotFound, TransientCloudError

PREFIX = "user.modelserve."
CAS_STALE_S = 30.0


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class LXDCloud(CloudBase):
    """The ``Cloud`` protocol on a local LXD daemon."""

    name = "lxd"

    def __init__(self, *, bridge: str | None = None, fip_prefix: str | None = None,
                 pool: str | None = None, profiles: tuple[str, ...] = ("default",),
                 client: pylxd.Client | None = None, sleep=time.sleep):
        self.bridge = bridge or os.environ.get("MODELSERVE_LXD_BRIDGE", "msbr0")
        # instances' root disk pool (default: the profile's). A btrfs/zfs pool clones the
        # image in ~1 s; the dir driver unpacks it at every launch (~30 s for the real image)
        self.pool = pool or os.environ.get("MODELSERVE_ROLLOUT_LXD_POOL") or None
        self._fip_prefix = fip_prefix or os.environ.get("MODELSERVE_LXD_FIP_PREFIX")
        self.profiles = list(profiles)
        self.sleep = sleep
        with self._errors("connecting to LXD"):
            self.client = client or pylxd.Client()
            self.client.api.get()

    # -- error translation ---------------------------------------------------------------
    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except LXDNotFound as exc:
            raise NotFound(f"{what}: not found ({exc})") from exc
        except LXDAPIException as exc:
            code = getattr(exc.response, "status_code", 0) or 0
            text = str(exc)
            if (code >= 500 and "already exists" not in text) or "is busy" in text:
                # "Instance is busy running a create operation": an interrupted create
                # still runs in the daemon; deleting works once it is done
                raise TransientCloudError(f"{what}: LXD {code}: {text}") from exc
            raise CloudError(f"{what}: LXD {code}: {text}") from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientCloudError(
                f"{what}: LXD does not answer ({exc}); is it running? `make local-cloud`"
            ) from exc
        except pylxd.exceptions.ClientConnectionFailed as exc:
            raise TransientCloudError(
                f"{what}: cannot reach LXD ({exc}); start it with `make local-cloud`") from exc

    def _wait_op(self, response: requests.Response, what: str) -> None:
        op = response.json().get("operation")
        if op:
            with self._errors(what):
                self.client.operations.wait_for_operation(op)

    # -- releases ------------------------------------------------------------------------
    def list_releases(self) -> list[Release]:
        """Every image carrying modelserve_release, newest first."""
        with self._errors("listing images"):
            meta = self.client.api.images.get(params={"recursion": 1}).json()["metadata"]
        out = []
        for img in meta:
            props = img.get("properties") or {}
            if not props.get("modelserve_release"):
                continue
            vals = {k: props.get(f"modelserve_{k}", "") for k in RELEASE_PROPERTIES}
            aliases = [a["name"] for a in img.get("aliases") or []]
            try:
                acc = float(vals["model_accuracy"]) if vals["model_accuracy"] else None
            except ValueError:
                acc = None
            out.append(Release(
                id=img["fingerprint"],
                name=next((a for a in aliases if a.startswith("modelserve-")),
                          aliases[0] if aliases else img["fingerprint"][:12]),
                release=vals["release"], model_sha256=vals["model_sha256"],
                model_accuracy=acc, git_sha=vals["git_sha"], app_version=vals["app_version"],
                built_at=vals["built_at"] or img.get("created_at", ""),
            ))
        return by_newest(out)

    def find_release(self, release: str) -> Release | None:
        """The image of one release, or None."""
        return next((r for r in self.list_releases() if r.release == release), None)

    def delete_release(self, release: Release, *, ignore_missing: bool = True) -> None:
        """Delete the image (and so its aliases)."""
        try:
            with self._errors(f"deleting image {release.name}"):
                resp = self.client.api.images[release.id].delete()
                self._wait_op(resp, f"deleting image {release.name}")
        except NotFound:
            if not ignore_missing:
                raise

    # -- instances -----------------------------------------------------------------------
    def _to_instance(self, meta: dict) -> Instance | None:
        config = meta.get("config") or {}
        labels = {k: config.get(PREFIX + k, "") for k in INSTANCE_LABELS}
        if not labels["env"]:
            return None
        status = (meta.get("status") or "").lower()
        address = None
        state = meta.get("state") or {}
        for nic_name, nic in (state.get("network") or {}).items():
            if nic_name == "lo":
                continue
            for addr in nic.get("addresses") or []:
                if addr.get("family") == "inet" and addr.get("scope") == "global":
                    address = addr["address"]
                    break
            if address:
                break
        if status == "running":
            norm = RUNNING if address else BUILDING
        elif status == "stopped":
            norm = STOPPED
        elif status == "error":
            norm = ERROR
        else:
            norm = BUILDING
        return Instance(
            id=meta["name"], name=meta["name"], env=labels["env"], release=labels["release"],
            colour=labels["colour"], role=labels["role"], deploy_id=labels["deploy_id"],
            status=norm, address=address, port=address, created_at=labels["created_at"],
            model_sha256=labels["model_sha256"],
            fault="" if norm != ERROR else meta.get("status", ""),
        )

    def list_instances(self, env: str | None) -> list[Instance]:
        """Rollout's containers (of ``env``, or all), oldest first."""
        with self._errors("listing instances"):
            meta = self.client.api.instances.get(params={"recursion": 2}).json()["metadata"]
        out = [i for i in (self._to_instance(m) for m in meta) if i is not None]
        if env is not None:
            out = [i for i in out if i.env == env]
        return sorted(out, key=lambda i: (i.created_at, i.name))

    def get_instance(self, instance_id: str) -> Instance:
        """One container by name, or NotFound."""
        with self._errors(f"reading instance {instance_id}"):
            meta = self.client.api.instances[instance_id].get().json()["metadata"]
            state = self.client.api.instances[instance_id].state.get().json()["metadata"]
        meta["state"] = state
        inst = self._to_instance(meta)
        if inst is None:
            raise NotFound(f"instance {instance_id} is not a modelserve instance")
        return inst

    def create_instance(self, spec: InstanceSpec) -> Instance:
        """Create the container from the release image with the seed, and start it."""
        config = {PREFIX + k: str(spec.labels.get(k, "")) for k in INSTANCE_LABELS}
        config["cloud-init.user-data"] = spec.user_data
        body = {
            "name": spec.name,
            "source": {"type": "image", "fingerprint": spec.release.id},
            "profiles": self.profiles,
            "config": config,
        }
        if self.pool:
            body["devices"] = {"root": {"path": "/", "pool": self.pool, "type": "disk"}}
        what = f"creating instance {spec.name} from {spec.release.name}"
        try:
            with self._errors(what):
                resp = self.client.api.instances.post(json=body)
            self._wait_op(resp, what)
            with self._errors(f"starting instance {spec.name}"):
                resp = self.client.api.instances[spec.name].state.put(
                    json={"action": "start", "timeout": 30})
            self._wait_op(resp, f"starting instance {spec.name}")
        except BaseException:
            # never leave a half-created container behind (Ctrl-C included)
            try:
                self.delete_instance(spec.name)
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            raise
        return self.get_instance(spec.name)

    def delete_instance(self, instance_id: str, *, ignore_missing: bool = True) -> None:
        """Force-stop and delete a container."""
        what = f"deleting instance {instance_id}"
        try:
            with self._errors(what):
                node = self.client.api.instances[instance_id]
                status = node.get().json()["metadata"].get("status", "")
                if status.lower() != "stopped":
                    resp = node.state.put(json={"action": "stop", "force": True, "timeout": 30})
                    self._wait_op(resp, what)
                resp = node.delete()
            self._wait_op(resp, what)
        except NotFound:
            if not ignore_missing:
                raise

    # -- floating IP -----------------------------------------------------------------------
    def _forwards(self) -> list[dict]:
        with self._errors(f"listing forwards of {self.bridge}"):
            return self.client.api.networks[self.bridge].forwards.get(
                params={"recursion": 1}).json()["metadata"]

    def _to_fip(self, fwd: dict) -> FloatingIP:
        cfg = fwd.get("config") or {}
        lock = None
        if cfg.get(PREFIX + "lock"):
            holder, since, deploy_id = (cfg[PREFIX + "lock"].split("|") + ["", "", ""])[:3]
            lock = Lock(holder, since, deploy_id)
        try:
            history = tuple(HistoryEvent.decode(e)
                            for e in json.loads(cfg.get(PREFIX + "history") or "[]"))
        except ValueError:
            history = ()
        return FloatingIP(
            id=fwd["listen_address"], address=fwd["listen_address"],
            env=cfg.get(PREFIX + "env", ""), target=cfg.get("target_address") or None,
            revision=cfg.get(PREFIX + "revision", "0"),
            state=FipState(live=cfg.get(PREFIX + "live", ""),
                           previous=cfg.get(PREFIX + "previous", ""), lock=lock),
            history=history,
        )

    def find_floating_ip(self, env: str) -> FloatingIP | None:
        """The forward whose user.modelserve.env is ``env``."""
        for fwd in self._forwards():
            if (fwd.get("config") or {}).get(PREFIX + "env") == env:
                return self._to_fip(fwd)
        return None

    def fip_network(self) -> ipaddress.IPv4Network:
        """Where floating addresses come from: the /24 after the bridge's, by default."""
        if self._fip_prefix:
            return ipaddress.IPv4Network(f"{self._fip_prefix}.0/24")
        with self._errors(f"reading network {self.bridge}"):
            cfg = self.client.api.networks[self.bridge].get().json()["metadata"]["config"]
        iface = ipaddress.IPv4Interface(cfg["ipv4.address"])
        base = int(iface.network.network_address) + iface.network.num_addresses
        return ipaddress.IPv4Network((base, 24))

    def create_floating_ip(self, env: str, address: str | None = None) -> FloatingIP:
        """A new forward (no target yet) on the lowest free address of the FIP /24."""
        used = {f["listen_address"] for f in self._forwards()}
        if address is None:
            hosts = [str(h) for h in list(self.fip_network().hosts())[9:]]
            address = next((h for h in hosts if h not in used), None)
            if address is None:
                raise CloudError(f"no free floating address left in {self.fip_network()}")
        body = {"listen_address": address, "description": f"modelserve floating IP ({env})",
                "config": {PREFIX + "env": env, PREFIX + "revision": "1"}}
        with self._errors(f"creating forward {address} on {self.bridge}"):
            self.client.api.networks[self.bridge].forwards.post(json=body)
        fip = self.find_floating_ip(env)
        if fip is None or fip.address != address:  # two operators raced to create it
            raise Conflict(f"floating IP of env {env} was created concurrently; retry")
        return fip

    @contextmanager
    def _cas_mutex(self, env: str) -> Iterator[None]:
        name = f"modelserve-cas-{env}"[:63]
        profiles = self.client.api.profiles
        try:
            with self._errors("taking the floating-IP mutex"):
                profiles.post(json={"name": name, "description": str(time.time()),
                                    "config": {}, "devices": {}})
        except CloudError as exc:
            # exists: busy, unless a killed process left it behind
            try:
                with self._errors("reading the floating-IP mutex"):
                    desc = profiles[name].get().json()["metadata"].get("description", "0")
                age = time.time() - float(desc or 0)
            except (CloudError, ValueError):
                age = 0.0
            if age > CAS_STALE_S:
                with self._errors("breaking a stale floating-IP mutex"):
                    profiles[name].delete()
            raise TransientCloudError(f"floating IP of env {env} is being updated") from exc
        try:
            yield
        finally:
            try:
                with self._errors("releasing the floating-IP mutex"):
                    profiles[name].delete()
            except NotFound:
                pass

    def update_floating_ip(self, fip: FloatingIP, *, target: str | None, state: FipState,
                           if_revision: str) -> FloatingIP:
        """One full PUT of the forward (target + state) if the revision is unchanged."""
        node = self.client.api.networks[self.bridge].forwards[fip.address]
        with self._cas_mutex(fip.env):
            with self._errors(f"reading forward {fip.address}"):
                current = node.get().json()["metadata"]
            cfg = dict(current.get("config") or {})
            if cfg.get(PREFIX + "revision", "0") != if_revision:
                raise Conflict(
                    f"floating IP {fip.address} (env {fip.env}) changed since it was read "
                    f"(revision {cfg.get(PREFIX + 'revision')} != {if_revision})")
            for key in ("live", "previous", "lock"):
                cfg.pop(PREFIX + key, None)
            cfg.pop("target_address", None)
            if target:
                cfg["target_address"] = target
            if state.live:
                cfg[PREFIX + "live"] = state.live
            if state.previous:
                cfg[PREFIX + "previous"] = state.previous
            if state.lock:
                lk = state.lock
                cfg[PREFIX + "lock"] = f"{lk.holder}|{lk.since}|{lk.deploy_id}"
            cfg[PREFIX + "revision"] = str(int(if_revision or "0") + 1)
            body = {"description": current.get("description", ""), "config": cfg,
                    "ports": current.get("ports") or []}
            with self._errors(f"updating forward {fip.address}"):
                node.put(json=body)
        found = self.find_floating_ip(fip.env)
        if found is None:
            raise NotFound(f"floating IP of env {fip.env} vanished during an update")
        return found

    def record_event(self, fip: FloatingIP, event: HistoryEvent) -> None:
        """Append to user.modelserve.history (last HISTORY_KEEP), under the mutex."""
        node = self.client.api.networks[self.bridge].forwards[fip.address]
        with self._cas_mutex(fip.env):
            with self._errors(f"reading forward {fip.address}"):
                current = node.get().json()["metadata"]
            cfg = dict(current.get("config") or {})
            try:
                hist = list(json.loads(cfg.get(PREFIX + "history") or "[]"))
            except ValueError:
                hist = []
            hist = (hist + [event.encode()])[-HISTORY_KEEP:]
            cfg[PREFIX + "history"] = json.dumps(hist)
            with self._errors(f"updating forward {fip.address}"):
                node.put(json={"description": current.get("description", ""), "config": cfg,
                               "ports": current.get("ports") or []})

    def delete_floating_ip(self, fip: FloatingIP, *, ignore_missing: bool = True) -> None:
        """Delete the forward."""
        try:
            with self._errors(f"deleting forward {fip.address}"):
                self.client.api.networks[self.bridge].forwards[fip.address].delete()
        except NotFound:
            if not ignore_missing:
                raise
