"""The local cloud: LXD (pylxd). The only module that talks to LXD.

Mapping (see base.py for the protocol):
* Project  = MODELSERVE_LXD_PROJECT (default ``default``); images, profiles and instances live
  in it (localcloud/lxd/project.py sets a project up); the bridge and its forwards are shared
  by all projects, so a forward records its project (``user.modelserve.project``) and only
  this project's forwards are seen.
* Release   = an LXD image with the property ``modelserve_release`` (alias ``modelserve-<r>``).
* Instance  = a system container (root disk on MODELSERVE_ROLLOUT_LXD_POOL, else the
  copy-on-write pool ``modelserve-cow`` when up.sh made one, else the profile's pool);
  labels in config keys ``user.modelserve.<label>``; its
  NoCloud user-data in ``cloud-init.user-data`` (the base image's templates write it to
  /var/lib/cloud/seed/nocloud-net/ at create and start). Its eth0 has a pinned
  ``ipv4.address`` (a static DHCP lease; LXD refuses to start a second NIC with the same
  address on the bridge, in any project). ``port`` = the instance NAME (invariant I2).
* FloatingIP = a network forward on the managed bridge (MODELSERVE_LXD_BRIDGE, msbr0):
  ``listen_address`` = the floating address, picked once per env from the /24 after the
  bridge's (MODELSERVE_LXD_FIP_PREFIX overrides, e.g. ``10.87.43``). The target is an
  instance name (``user.modelserve.target``); the forward has ONE port, tcp APP_PORT (8080),
  whose ``target_address`` is that instance's pinned address, resolved at every update, never
  a DHCP address another container could get. There is no default target: no other port of
  the instance (AMQP, Redis, ssh) is reachable through the floating address.
  State in config keys ``user.modelserve.{env,project,target,live,previous,lock,revision,
  history}``.
* Compare-and-swap: LXD 5.0 ignores If-Match on forwards, so ``update_floating_ip`` runs
  read-compare-write under a mutex that IS atomic in LXD: creating the profile
  ``modelserve-cas-<env>`` (a second create gets an error). Its description holds a random
  token and a time; the holder deletes it only while it still carries its token. A mutex
  older than ``CAS_STALE_S`` (a killed process) is broken by the one process that creates
  the break ticket ``...-brk-<stale token>`` (a create again: atomic); ETags are no help
  (LXD 5.0.2 checks If-Match on profiles, but not atomically: measured). The write is one
  full PUT of the forward (never delete + re-add: that drops requests).
* Every request has a timeout (``LXD_HTTP_TIMEOUT``); every operation wait is bounded
  (``LXD_OP_TIMEOUT``, MODELSERVE_LXD_OP_TIMEOUT overrides).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pylxd
import requests
from pylxd.exceptions import LXDAPIException
from pylxd.exceptions import NotFound as LXDNotFound

from rollout.clouds.base import (
    APP_PORT,
    BUILDING,
    ERROR,
    HISTORY_KEEP,
    INSTANCE_LABELS,
    RUNNING,
    STOPPED,
    CloudBase,
    FipState,
    FloatingIP,
    HistoryEvent,
    Instance,
    InstanceSpec,
    Lock,
    Preview,
    Release,
    by_newest,
)
from rollout.errors import CloudError, Conflict, NotFound, TransientCloudError, WaitTimeout

PREFIX = "user.modelserve."
CAS_STALE_S = 30.0
#: (connect, read) seconds for every LXD request; operation waits have their own bound
LXD_HTTP_TIMEOUT = (10.0, 120.0)
LXD_OP_TIMEOUT = 600.0
COW_POOL = "modelserve-cow"  # localcloud/lxd/up.sh creates it where btrfs and loop devices allow
#: start failures that mean "that pinned address is taken": pick another one
ADDRESS_TAKEN = ("already defined on another NIC", "already in use")



def _app_ports(address: str | None) -> list[dict]:
    """The forward's only port: tcp APP_PORT to ``address`` (none without a target)."""
    if not address:
        return []
    return [{"description": "modelserve app", "protocol": "tcp", "listen_port": str(APP_PORT),
             "target_address": address, "target_port": str(APP_PORT)}]


def _forwarded_address(fwd: dict) -> str:
    """Where the forward sends APP_PORT: its app port's target, or (older forwards) the
    default target that forwarded every port."""
    for port in fwd.get("ports") or []:
        if port.get("protocol") == "tcp" and str(port.get("listen_port")) == str(APP_PORT):
            return str(port.get("target_address") or "")
    return str((fwd.get("config") or {}).get("target_address") or "")

def _pinned(meta: dict) -> str | None:
    """The pinned ``ipv4.address`` of an instance's eth0, if any."""
    devices = meta.get("expanded_devices") or meta.get("devices") or {}
    return (devices.get("eth0") or {}).get("ipv4.address") or None


class LXDCloud(CloudBase):
    """The ``Cloud`` protocol on a local LXD daemon."""

    name = "lxd"

    def __init__(self, *, bridge: str | None = None, fip_prefix: str | None = None,
                 pool: str | None = None, profiles: tuple[str, ...] = ("default",),
                 client: pylxd.Client | None = None, sleep=time.sleep,
                 project: str | None = None, op_timeout: float | None = None):
        self.bridge = bridge or os.environ.get("MODELSERVE_LXD_BRIDGE", "msbr0")
        self.project = (project or os.environ.get("MODELSERVE_LXD_PROJECT", "").strip()
                        or "default")
        # instances' root disk pool: explicit, else the local cloud's copy-on-write pool when
        # it exists (resolved at the first launch, see ``pool``), else the profile's.
        self._pool = pool or os.environ.get("MODELSERVE_ROLLOUT_LXD_POOL") or None
        self._pool_resolved = self._pool is not None
        self._fip_prefix = fip_prefix or os.environ.get("MODELSERVE_LXD_FIP_PREFIX")
        self.profiles = list(profiles)
        self.sleep = sleep
        self.op_timeout = float(op_timeout or os.environ.get("MODELSERVE_LXD_OP_TIMEOUT")
                                or LXD_OP_TIMEOUT)
        self._global: pylxd.Client | None = None
        with self._errors("connecting to LXD"):
            self.client = client or pylxd.Client(project=self.project, timeout=LXD_HTTP_TIMEOUT)
            self.client.api.get()
        if self.project != "default":
            try:
                with self._errors(f"reading LXD project {self.project}"):
                    self.client.api.projects[self.project].get()
            except NotFound:
                raise CloudError(
                    f"LXD project {self.project} (MODELSERVE_LXD_PROJECT) does not exist: "
                    f"python3 -m localcloud.lxd.project ensure {self.project}") from None

    @property
    def global_client(self) -> pylxd.Client:
        """A client without a project (reads across projects: instances, leases)."""
        if self._global is None:
            with self._errors("connecting to LXD"):
                self._global = pylxd.Client(timeout=LXD_HTTP_TIMEOUT)
        return self._global

    # -- error translation ---------------------------------------------------------------
    @staticmethod
    def _classify(what: str, code: int, text: str) -> CloudError:
        if (code >= 500 and "already exists" not in text) or "is busy" in text:
            # "Instance is busy running a create operation": an interrupted create
            # still runs in the daemon; deleting works once it is done
            return TransientCloudError(f"{what}: LXD {code}: {text}")
        return CloudError(f"{what}: LXD {code}: {text}")

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except LXDNotFound as exc:
            raise NotFound(f"{what}: not found ({exc})") from exc
        except LXDAPIException as exc:
            code = getattr(exc.response, "status_code", 0) or 0
            raise self._classify(what, code, str(exc)) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientCloudError(
                f"{what}: LXD does not answer ({exc}); is it running? `make local-cloud`"
            ) from exc
        except pylxd.exceptions.ClientConnectionFailed as exc:
            raise TransientCloudError(
                f"{what}: cannot reach LXD ({exc}); start it with `make local-cloud`") from exc

    def _wait_op(self, response: requests.Response, what: str,
                 timeout: float | None = None) -> None:
        """Wait for the operation a request started, at most ``timeout`` (op_timeout)."""
        op = response.json().get("operation")
        if not op:
            return
        op_id = op.rstrip("/").rsplit("/", 1)[-1]
        deadline = time.monotonic() + (timeout or self.op_timeout)
        while True:
            left = max(1, min(60, int(deadline - time.monotonic())))
            with self._errors(what):
                body = self.client.api.operations[op_id].wait.get(
                    params={"timeout": left}, timeout=(LXD_HTTP_TIMEOUT[0], left + 30)).json()
            meta = body.get("metadata") or {}
            status = meta.get("status", "")
            if status == "Success":
                return
            if status in ("Failure", "Cancelled") or (not meta and body.get("error")):
                err = meta.get("err") or body.get("error") or status
                raise self._classify(what, int(meta.get("status_code") or 400), err)
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"{what}: LXD operation {op_id} did not finish within "
                                  f"{timeout or self.op_timeout:.0f} s")

    # -- releases ------------------------------------------------------------------------
    def list_releases(self) -> list[Release]:
        """Every image carrying modelserve_release, newest first."""
        with self._errors("listing images"):
            meta = self.client.api.images.get(params={"recursion": 1}).json()["metadata"]
        out = []
        for img in meta:
            props = img.get("properties") or {}
            aliases = [a["name"] for a in img.get("aliases") or []]
            name = next((a for a in aliases if a.startswith("modelserve-")),
                        aliases[0] if aliases else img["fingerprint"][:12])
            rel = Release.from_properties(img["fingerprint"], name, props,
                                          created_at=img.get("created_at", ""))
            if rel is not None:
                out.append(rel)
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
        pinned = _pinned(meta)
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
        if pinned and address and address != pinned:
            address = None  # not (yet) on its own address: not reachable as itself
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
            status=norm, address=address, port=meta["name"], created_at=labels["created_at"],
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

    def bridge_network(self) -> ipaddress.IPv4Interface:
        """The bridge's own address and subnet (e.g. 10.87.42.1/24)."""
        with self._errors(f"reading network {self.bridge}"):
            cfg = self.client.api.networks[self.bridge].get().json()["metadata"]["config"]
        return ipaddress.IPv4Interface(cfg["ipv4.address"])

    def used_addresses(self) -> set[str]:
        """Every IPv4 on the bridge that is pinned or leased, in any project."""
        api = self.global_client.api
        used: set[str] = set()
        with self._errors("listing instances of all projects"):
            metas = api.instances.get(params={"recursion": 1, "all-projects": "true"}
                                      ).json()["metadata"]
        for meta in metas:
            for dev in (meta.get("expanded_devices") or {}).values():
                if dev.get("type") == "nic" and dev.get("ipv4.address"):
                    used.add(dev["ipv4.address"])
        with self._errors("listing projects"):
            projects = [p.rsplit("/", 1)[-1].split("?")[0]
                        for p in api.projects.get().json()["metadata"]]
        for project in projects:
            with self._errors(f"listing DHCP leases of {self.bridge}"):
                leases = api.networks[self.bridge].leases.get(
                    params={"project": project}).json()["metadata"]
            used |= {lease["address"] for lease in leases or [] if lease.get("address")}
        return used

    def pick_address(self, avoid: set[str] = frozenset()) -> str:
        """A free address of the bridge's subnet (random among the free upper half)."""
        iface = self.bridge_network()
        hosts = list(iface.network.hosts())
        taken = self.used_addresses() | set(avoid) | {str(iface.ip)}
        free = [str(h) for h in hosts[len(hosts) // 2:-1] if str(h) not in taken]
        if not free:
            free = [str(h) for h in hosts[10:-1] if str(h) not in taken]
        if not free:
            raise CloudError(f"no free address left on {self.bridge} ({iface.network})")
        return secrets.choice(free)

    def pick_addresses(self, count: int) -> list[str]:
        """``count`` distinct free addresses, for instances whose seeds must name them before
        they exist (the front's certificate and broker peers): ``create_instance`` pins
        ``spec.address`` as given (never another one)."""
        picked: list[str] = []
        for _ in range(count):
            picked.append(self.pick_address(set(picked)))
        return picked

    @property
    def pool(self) -> str | None:
        """The pool instances' root disks go on (None: the profile's).

        MODELSERVE_ROLLOUT_LXD_POOL when set; otherwise the copy-on-write pool that
        localcloud/lxd/up.sh creates where the machine allows it (MODELSERVE_LXD_COW_POOL,
        default ``modelserve-cow``): a btrfs pool clones the image's volume in about a second,
        where the dir pool unpacks the whole rootfs at every launch (12-30 s for the real
        image). Looked up once, at the first launch; an unreadable pool list means the
        profile's pool, as before.
        """
        if not self._pool_resolved:
            self._pool_resolved = True
            name = os.environ.get("MODELSERVE_LXD_COW_POOL", "").strip() or COW_POOL
            try:
                self.client.api.storage_pools[name].get()
                self._pool = name
            except Exception:  # noqa: BLE001 - absent or unreadable: the profile's pool
                self._pool = None
        return self._pool

    def create_instance(self, spec: InstanceSpec) -> Instance:
        """Create the container from the release image with the seed and a pinned address
        (invariant I2), and start it. LXD refuses to start a NIC whose pinned address another
        NIC on the bridge has (any project): then another address is tried."""
        config = {PREFIX + k: str(spec.labels.get(k, "")) for k in INSTANCE_LABELS}
        config["cloud-init.user-data"] = spec.user_data
        tried: set[str] = set()
        for attempt in range(1, 6):
            # an address chosen beforehand is in the seed: that one, or fail
            address = spec.address or self.pick_address(tried)
            tried.add(address)
            devices = {"eth0": {"type": "nic", "name": "eth0", "network": self.bridge,
                                "ipv4.address": address}}
            if self.pool:
                devices["root"] = {"path": "/", "pool": self.pool, "type": "disk"}
            body = {"name": spec.name, "source": {"type": "image", "fingerprint": spec.release.id},
                    "profiles": self.profiles, "config": config, "devices": devices}
            what = f"creating instance {spec.name} from {spec.release.name}"
            try:
                with self._errors(what):
                    resp = self.client.api.instances.post(json=body)
                self._wait_op(resp, what)
                with self._errors(f"starting instance {spec.name}"):
                    resp = self.client.api.instances[spec.name].state.put(
                        json={"action": "start", "timeout": 30})
                self._wait_op(resp, f"starting instance {spec.name}")
            except BaseException as exc:
                # never leave a half-created container behind (Ctrl-C included)
                try:
                    self.delete_instance(spec.name)
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
                if (isinstance(exc, CloudError) and attempt < 5 and not spec.address
                        and any(t in str(exc) for t in ADDRESS_TAKEN)):
                    continue  # a racing create pinned the same address
                raise
            return self.get_instance(spec.name)
        raise CloudError(f"creating instance {spec.name}: no free address")  # pragma: no cover

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
    def _mine(self, fwd: dict) -> bool:
        """A forward of this project (forwards are shared by all projects on the bridge)."""
        cfg = fwd.get("config") or {}
        return (cfg.get(PREFIX + "project") or "default") == self.project

    def _forwards(self, *, all_projects: bool = False) -> list[dict]:
        with self._errors(f"listing forwards of {self.bridge}"):
            fwds = self.client.api.networks[self.bridge].forwards.get(
                params={"recursion": 1}).json()["metadata"]
        return list(fwds) if all_projects else [f for f in fwds if self._mine(f)]

    def _to_fip(self, fwd: dict) -> FloatingIP:
        cfg = fwd.get("config") or {}
        lock = Lock.decode(cfg[PREFIX + "lock"]) if cfg.get(PREFIX + "lock") else None
        try:
            history = tuple(HistoryEvent.decode(e)
                            for e in json.loads(cfg.get(PREFIX + "history") or "[]"))
        except ValueError:
            history = ()
        # the target is an instance name; a forward written by an older rollout has only a
        # bare address (shown as is; the next switch replaces it by a name)
        target = cfg.get(PREFIX + "target") or _forwarded_address(fwd) or None
        return FloatingIP(
            id=fwd["listen_address"], address=fwd["listen_address"],
            env=cfg.get(PREFIX + "env", ""), target=target,
            revision=cfg.get(PREFIX + "revision", "0"),
            state=FipState(live=cfg.get(PREFIX + "live", ""),
                           previous=cfg.get(PREFIX + "previous", ""), lock=lock,
                           preview=Preview.decode(cfg.get(PREFIX + "preview", ""))),
            history=history,
        )

    def _env_forwards(self, env: str) -> list[dict]:
        fwds = [f for f in self._forwards() if (f.get("config") or {}).get(PREFIX + "env") == env]
        return sorted(fwds, key=lambda f: ipaddress.IPv4Address(f["listen_address"]))

    def find_floating_ip(self, env: str) -> FloatingIP | None:
        """The forward whose user.modelserve.env is ``env`` (the lowest, should two exist)."""
        fwds = self._env_forwards(env)
        return self._to_fip(fwds[0]) if fwds else None

    def fip_network(self) -> ipaddress.IPv4Network:
        """Where floating addresses come from: the /24 after the bridge's, by default."""
        if self._fip_prefix:
            return ipaddress.IPv4Network(f"{self._fip_prefix}.0/24")
        iface = self.bridge_network()
        base = int(iface.network.network_address) + iface.network.num_addresses
        return ipaddress.IPv4Network((base, 24))

    def create_floating_ip(self, env: str, address: str | None = None) -> FloatingIP:
        """A new forward (no target yet) on the lowest free address of the FIP /24.

        Race-free per env (invariant I11): created under the env's mutex, and only when the
        env has none; a racing creator gets ``Conflict`` and deletes nothing but its own."""
        with self._cas_mutex(env):
            if self._env_forwards(env):
                raise Conflict(f"floating IP of env {env} was created concurrently")
            used = {f["listen_address"] for f in self._forwards(all_projects=True)}
            if address is None:
                hosts = [str(h) for h in list(self.fip_network().hosts())[9:]]
                address = next((h for h in hosts if h not in used), None)
                if address is None:
                    raise CloudError(f"no free floating address left in {self.fip_network()}")
            body = {"listen_address": address,
                    "description": f"modelserve floating IP ({self.project}/{env})",
                    "config": {PREFIX + "env": env, PREFIX + "revision": "1",
                               PREFIX + "project": self.project}}
            with self._errors(f"creating forward {address} on {self.bridge}"):
                self.client.api.networks[self.bridge].forwards.post(json=body)
            fwds = self._env_forwards(env)
        if not fwds or fwds[0]["listen_address"] != address:
            # another creator won (the lowest address of the env is the one that counts)
            try:
                with self._errors(f"deleting forward {address}"):
                    self.client.api.networks[self.bridge].forwards[address].delete()
            except NotFound:
                pass
            raise Conflict(f"floating IP of env {env} was created concurrently")
        return self._to_fip(fwds[0])

    # -- the compare-and-swap mutex --------------------------------------------------------
    def _mutex_name(self, env: str) -> str:
        return f"modelserve-cas-{env}"[:63]

    @contextmanager
    def _cas_mutex(self, env: str) -> Iterator[None]:
        """Hold the env's mutex profile (see module doc) for the block, or raise
        TransientCloudError when someone else holds it."""
        name = self._mutex_name(env)
        token = secrets.token_hex(8)
        self._mutex_acquire(name, token, env)
        try:
            yield
        finally:
            self._mutex_release(name, token)

    def _mutex_acquire(self, name: str, token: str, env: str) -> None:
        """Create the mutex profile (atomic in LXD: a second create fails). A stale one (its
        holder was killed) is broken by ONE process: the one that creates the break ticket
        ``<name>-brk-<stale token>`` (atomic too); it re-reads the mutex, deletes it only if it
        still carries the stale token, then competes with a plain create like everyone else.
        (LXD 5.0.2 checks If-Match on a profile PUT but not atomically: two PUTs with the
        same ETag can both succeed, measured; so ETags are no mutex.)"""
        busy = TransientCloudError(f"floating IP of env {env} is being updated")
        if self._mutex_create(name, token):
            return
        stale = self._mutex_stale_token(name)
        if stale is None:
            raise busy
        ticket = f"{name[:40]}-brk-{stale[:16]}"
        if not self._mutex_create(ticket, token):
            raise busy  # another process is breaking it
        try:
            if self._mutex_stale_token(name) == stale:
                with suppress(LXDAPIException, requests.RequestException):
                    self.client.api.profiles[name].delete()
            if not self._mutex_create(name, token):
                raise busy
        finally:
            with suppress(LXDAPIException, requests.RequestException):
                self.client.api.profiles[ticket].delete()

    def _mutex_create(self, name: str, token: str) -> bool:
        """True when this call created the profile ``name`` (so holds it)."""
        held = f"held|{token}|{time.time():.3f}|{os.getpid()}"
        try:
            self.client.api.profiles.post(json={"name": name, "description": held,
                                                "config": {}, "devices": {}})
            return True
        except LXDAPIException as exc:
            code = getattr(exc.response, "status_code", 0) or 0
            if "already exists" in str(exc) or code == 409:
                return False
            raise self._classify("taking the floating-IP mutex", code, str(exc)) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientCloudError(f"taking the floating-IP mutex: {exc}") from exc

    def _mutex_stale_token(self, name: str) -> str | None:
        """The holder token of a mutex older than CAS_STALE_S, else None."""
        try:
            with self._errors("reading the floating-IP mutex"):
                desc = self.client.api.profiles[name].get().json()["metadata"].get(
                    "description", "")
        except NotFound:
            return None
        parts = desc.split("|")
        try:
            age = time.time() - float(parts[2])
        except (IndexError, ValueError):
            return desc or "legacy"  # an older rollout's mutex: its text is its token
        return parts[1] if age > CAS_STALE_S else None

    def _mutex_release(self, name: str, token: str) -> None:
        """Delete the mutex only while it carries our token: a process that judged us stale
        and took it over keeps it."""
        profiles = self.client.api.profiles
        with suppress(LXDAPIException, requests.RequestException):
            desc = profiles[name].get().json()["metadata"].get("description", "")
            if desc.split("|")[1:2] == [token]:
                profiles[name].delete()
            # else: taken over (we were judged stale): not ours to release

    def _drop_mutex(self, env: str, *, force: bool = False) -> None:
        """Delete the env's leftover break tickets and its mutex when stale (a killed
        holder's), or whatever its state with ``force`` (tests: nobody else uses the env)."""
        name = self._mutex_name(env)
        with suppress(LXDAPIException, requests.RequestException, CloudError):
            for url in self.client.api.profiles.get().json()["metadata"]:
                prof = url.rsplit("/", 1)[-1].split("?")[0]
                if prof.startswith(f"{name[:40]}-brk-") or (prof == name and (
                        force or self._mutex_stale_token(name) is not None)):
                    self.client.api.profiles[prof].delete()

    def update_floating_ip(self, fip: FloatingIP, *, target: str | None, state: FipState,
                           if_revision: str) -> FloatingIP:
        """One full PUT of the forward (target + state) if the revision is unchanged.

        ``target`` is an instance name; ``target_address`` becomes its pinned address, read
        now (a target unchanged since the last write is kept as written)."""
        node = self.client.api.networks[self.bridge].forwards[fip.address]
        with self._cas_mutex(fip.env):
            with self._errors(f"reading forward {fip.address}"):
                current = node.get().json()["metadata"]
            cfg = dict(current.get("config") or {})
            if cfg.get(PREFIX + "revision", "0") != if_revision:
                raise Conflict(
                    f"floating IP {fip.address} (env {fip.env}) changed since it was read "
                    f"(revision {cfg.get(PREFIX + 'revision')} != {if_revision})")
            old_address = _forwarded_address(current)
            old_target = cfg.get(PREFIX + "target") or old_address or None
            for key in ("live", "previous", "lock", "target", "preview"):
                cfg.pop(PREFIX + key, None)
            # a forward written by an older rollout forwarded every port (a default target)
            cfg.pop("target_address", None)
            address = None
            if target and target == old_target:
                address = old_address
                if target != old_address:
                    cfg[PREFIX + "target"] = target
            elif target:
                address = self._target_address(target)
                cfg[PREFIX + "target"] = target
            if state.live:
                cfg[PREFIX + "live"] = state.live
            if state.previous:
                cfg[PREFIX + "previous"] = state.previous
            if state.lock:
                cfg[PREFIX + "lock"] = state.lock.encode()
            if state.preview:
                cfg[PREFIX + "preview"] = state.preview.encode()
            cfg[PREFIX + "revision"] = str(int(if_revision or "0") + 1)
            body = {"description": current.get("description", ""), "config": cfg,
                    "ports": _app_ports(address)}
            with self._errors(f"updating forward {fip.address}"):
                node.put(json=body)
        found = self.find_floating_ip(fip.env)
        if found is None:
            raise NotFound(f"floating IP of env {fip.env} vanished during an update")
        return found

    def _target_address(self, name: str) -> str:
        """The pinned address of instance ``name`` (what its forward may point at)."""
        with self._errors(f"reading instance {name}"):
            meta = self.client.api.instances[name].get().json()["metadata"]
        address = _pinned(meta)
        if not address:
            raise CloudError(f"instance {name} has no pinned ipv4.address (created by an older "
                             "rollout): the floating IP never targets a DHCP address; "
                             "deploy the release again")
        return address

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
        """Delete the forward (and the env's mutex profile, when free)."""
        try:
            with self._errors(f"deleting forward {fip.address}"):
                self.client.api.networks[self.bridge].forwards[fip.address].delete()
        except NotFound:
            if not ignore_missing:
                raise
        if fip.env and not self._env_forwards(fip.env):
            self._drop_mutex(fip.env)
