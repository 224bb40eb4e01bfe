"""The OpenStack cloud (openstacksdk): the only module that imports ``openstack``.

Mapping (see base.py for the protocol):
* Release    = a Glance image with the property ``modelserve_release`` (name
  ``modelserve-<release>``). Glance's list API silently drops unknown filters, so the
  properties are matched client-side.
* Instance   = a Nova server with metadata ``modelserve_<label>`` and the tags ``modelserve``
  and ``modelserve-env-<env>``; its NoCloud seed is the server's user_data. ``address`` = its
  fixed IPv4, ``port`` = its Neutron port (what the floating IP points at).
* FloatingIP = a Neutron floating IP tagged ``modelserve-env-<env>``; ``FipState`` lives in
  its ``description`` and the history in tags ``h:<seq>:<event>``. A switch is ONE
  ``update_ip(port_id=…, description=…, if_revision=N)``: Neutron sends If-Match, so a
  concurrent change answers 412, which becomes ``Conflict``.

Configuration (environment, all optional): ``OS_CLOUD`` (clouds.yaml entry),
``MODELSERVE_OS_FLAVOR`` (default m1.small), ``MODELSERVE_OS_NETWORK`` (default: the only
non-external network the project sees), ``MODELSERVE_OS_EXTERNAL_NETWORK`` (default: the only
external network), ``MODELSERVE_OS_SECURITY_GROUP`` (one group for every role; default:
the per-role groups below), ``MODELSERVE_OS_KEYPAIR`` (default none),
``MODELSERVE_OS_API_TIMEOUT`` (seconds, 30).

Security groups per role (created, and checked at every run, by ``_role_groups``): a front
gets ``modelserve-web`` (tcp 8080 from anywhere) and ``modelserve-broker`` (tcp 5671 and 6380,
its RabbitMQ and Redis over TLS, from the ``modelserve-worker`` group only); a worker gets
``modelserve-worker`` (no ingress). A group with an ingress rule rollout did not make is
refused (``CloudError``, naming the rule), missing rules are added; the oldest group of a name
is the one used (two racing first runs may both create one).
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone

import openstack
from keystoneauth1 import exceptions as ks_exc
from openstack import exceptions as os_exc

from rollout.clouds import token_cache
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
    Release,
    by_newest,
)
from rollout.errors import AuthError, CloudError, Conflict, NotFound, TransientCloudError

TAG = "modelserve"
META = "modelserve_"
HISTORY_TAG = "h:"
_GONE = ("DELETED", "SOFT_DELETED")


MUTEX_STALE_S = 60.0
MUTEX_WAIT_S = 90.0


def mutex_mac(env: str) -> str:
    """A locally administered unicast MAC derived from the env name (the creation mutex)."""
    digest = hashlib.sha256(f"modelserve-env-{env}".encode()).digest()
    return "02:6d:73:" + ":".join(f"{b:02x}" for b in digest[:3])


def _age_s(created_at: str | None) -> float:
    try:
        when = datetime.fromisoformat(str(created_at).replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - when).total_seconds()


def env_tag(env: str) -> str:
    """The tag that marks servers and floating IPs of one environment."""
    return f"modelserve-env-{env}"


WEB_GROUP, BROKER_GROUP, WORKER_GROUP = "modelserve-web", "modelserve-broker", "modelserve-worker"
ROLE_GROUPS = {"front": (WEB_GROUP, BROKER_GROUP), "worker": (WORKER_GROUP,)}
BROKER_TLS_PORTS = (5671, 6380)  # RabbitMQ and Redis over TLS (rollout/seed.py)


class OpenStackCloud(CloudBase):
    """The ``Cloud`` protocol on Glance, Nova and Neutron."""

    name = "openstack"

    def __init__(self, *, cloud: str | None = None, conn=None, flavor: str | None = None,
                 network: str | None = None, external_network: str | None = None,
                 security_group: str | None = None, keypair: str | None = None,
                 sleep=time.sleep):
        env = os.environ.get
        self.sleep = sleep
        self.flavor = flavor or env("MODELSERVE_OS_FLAVOR") or "m1.small"
        self._network = network or env("MODELSERVE_OS_NETWORK")
        self._external = external_network or env("MODELSERVE_OS_EXTERNAL_NETWORK")
        self._secgroup = security_group or env("MODELSERVE_OS_SECURITY_GROUP")
        self.keypair = keypair or env("MODELSERVE_OS_KEYPAIR") or None
        self._ids: dict[str, str] = {}
        self._groups: dict[str, str] = {}  # per-role security groups, name -> id
        with self._errors("connecting to OpenStack"):
            self.conn = conn or openstack.connect(
                cloud=cloud or env("OS_CLOUD"),
                api_timeout=float(env("MODELSERVE_OS_API_TIMEOUT", "30")))
            if conn is None:  # our own connection: reuse the user's cached token (opt-out)
                token_cache.attach(self.conn)

    @property
    def concurrent_reads(self) -> bool:
        """Whether ``observe`` may run its reads side by side: independent HTTP calls through
        one keystoneauth session, but only once the session holds a token (the cached one, or
        one a first call fetched). Before that, each thread would log in on its own, and a
        wrong password would count one failed login per thread towards a lockout (I10)."""
        ref = getattr(getattr(self.conn.session, "auth", None), "auth_ref", None)
        try:
            return ref is not None and not ref.will_expire_soon(30)
        except Exception:  # noqa: BLE001 - an odd plugin: one read after the other
            return False

    # -- error translation ---------------------------------------------------------------
    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Translate SDK errors to rollout's (invariant I10): 401/403 and keystone auth
        failures are ``AuthError`` (permanent: a retried wrong password counts towards a
        lockout); 5xx, 408/409/429 and connection errors are transient; the rest permanent."""
        try:
            yield
        except (ks_exc.Unauthorized, ks_exc.http.Forbidden, ks_exc.AuthorizationFailure) as exc:
            raise AuthError(_auth_text(what, exc)) from exc
        except os_exc.NotFoundException as exc:
            raise NotFound(f"{what}: not found ({_short(exc)})") from exc
        except os_exc.HttpException as exc:
            code = exc.status_code or 0
            text = _short(exc)
            if code in (401, 403):
                raise AuthError(_auth_text(what, exc, code)) from exc
            if code == 412:
                raise Conflict(f"{what}: changed concurrently (HTTP 412, revision mismatch); "
                               "observe again and retry") from exc
            if "quota" in text.lower() or "overquota" in text.lower().replace(" ", ""):
                raise CloudError(f"{what}: quota exceeded ({text}); free resources or raise "
                                 "the project's quota") from exc
            if code == 409 and "already has a floating ip" in text.lower():
                # Neutron: one floating IP per fixed IP and external network; permanent
                raise CloudError(f"{what}: HTTP 409: {text}") from exc
            if code >= 500 or code in (408, 409, 429):
                raise TransientCloudError(f"{what}: HTTP {code}: {text}") from exc
            raise CloudError(f"{what}: HTTP {code}: {text}") from exc
        except ks_exc.ConnectionError as exc:
            raise TransientCloudError(f"{what}: cannot reach the service ({_short(exc)})"
                                      ) from exc
        except ks_exc.http.HttpError as exc:
            code = getattr(exc, "http_status", None) or 0
            if code in (401, 403):
                raise AuthError(_auth_text(what, exc, code)) from exc
            if code >= 500 or code in (408, 409, 429):
                raise TransientCloudError(f"{what}: HTTP {code}: {_short(exc)}") from exc
            raise CloudError(f"{what}: HTTP {code}: {_short(exc)}") from exc
        except ks_exc.EndpointNotFound as exc:
            raise CloudError(f"{what}: no such service in the catalog ({exc})") from exc
        except ks_exc.ClientException as exc:
            raise TransientCloudError(f"{what}: {_short(exc)}") from exc
        except os_exc.SDKException as exc:
            raise CloudError(f"{what}: {_short(exc)}") from exc

    # -- resolved names --------------------------------------------------------------------
    def _network_id(self) -> str:
        if "net" not in self._ids:
            with self._errors("finding the project network"):
                if self._network:
                    net = self.conn.network.find_network(self._network, ignore_missing=False)
                else:
                    nets = [n for n in self.conn.network.networks()
                            if not n.is_router_external]
                    if len(nets) != 1:
                        raise CloudError(
                            f"the project sees {len(nets)} networks; set "
                            "MODELSERVE_OS_NETWORK to the one servers should use")
                    net = nets[0]
            self._ids["net"] = net.id
        return self._ids["net"]

    def _external_id(self) -> str:
        if "ext" not in self._ids:
            with self._errors("finding the external network"):
                if self._external:
                    net = self.conn.network.find_network(self._external, ignore_missing=False)
                else:
                    nets = list(self.conn.network.networks(is_router_external=True))
                    if len(nets) != 1:
                        raise CloudError(
                            f"the cloud has {len(nets)} external networks; set "
                            "MODELSERVE_OS_EXTERNAL_NETWORK to the floating-IP pool")
                    net = nets[0]
            self._ids["ext"] = net.id
        return self._ids["ext"]

    def _security_groups(self, role: str = "front") -> list[dict]:
        """Nova's ``security_groups`` for a server of ``role``: the configured group, else
        the role's groups (by id: names need not be unique in Neutron)."""
        if self._secgroup:
            return [{"name": self._secgroup}]
        ids = self._role_groups()
        return [{"name": ids[name]} for name in ROLE_GROUPS.get(role, ROLE_GROUPS["front"])]

    def _role_groups(self) -> dict[str, str]:
        """Group name -> id of the per-role groups, created or checked once per run."""
        if not self._groups:
            worker = self._ensure_group(WORKER_GROUP, set())
            self._groups = {
                WORKER_GROUP: worker,
                WEB_GROUP: self._ensure_group(WEB_GROUP, {
                    ("IPv4", "tcp", APP_PORT, APP_PORT, "0.0.0.0/0", None)}),
                BROKER_GROUP: self._ensure_group(BROKER_GROUP, {
                    ("IPv4", "tcp", port, port, None, worker) for port in BROKER_TLS_PORTS})}
        return self._groups

    def _oldest_group(self, name: str):
        with self._errors(f"listing security groups {name}"):
            groups = list(self.conn.network.security_groups(name=name))
        groups = [g for g in groups if g.name == name]
        return min(groups, key=lambda g: (g.created_at or "", g.id)) if groups else None

    def _ensure_group(self, name: str, expected: set[tuple]) -> str:
        """The id of security group ``name`` whose ingress rules are exactly ``expected``
        (ethertype, protocol, port min, port max, remote prefix, remote group id): created
        when missing, missing rules added, a foreign ingress rule refused."""
        sg = self._oldest_group(name)
        if sg is None:
            with self._errors(f"creating security group {name}"):
                mine = self.conn.network.create_security_group(
                    name=name, description=f"modelserve {name} (made by rollout)")
            sg = self._oldest_group(name) or mine
            if sg.id != mine.id:  # a racing run made one first: use it, drop ours
                with suppress(Exception):
                    self.conn.network.delete_security_group(mine.id, ignore_missing=True)
        with self._errors(f"reading the rules of security group {name}"):
            rules = list(self.conn.network.security_group_rules(security_group_id=sg.id))
        have = {(r.ether_type, r.protocol, r.port_range_min, r.port_range_max,
                 r.remote_ip_prefix, r.remote_group_id) for r in rules
                if r.direction == "ingress"}
        extra = have - expected
        if extra:
            raise CloudError(
                f"security group {name} ({sg.id}) has ingress rules rollout did not make: "
                f"{sorted(extra, key=str)}; remove them, or set MODELSERVE_OS_SECURITY_GROUP")
        for ether, proto, lo, hi, prefix, group in sorted(expected - have, key=str):
            with self._errors(f"adding a rule to security group {name}"):
                rule = dict(security_group_id=sg.id, direction="ingress", ethertype=ether,
                            protocol=proto, port_range_min=lo, port_range_max=hi,
                            remote_ip_prefix=prefix, remote_group_id=group)
                try:
                    self.conn.network.create_security_group_rule(
                        **{k: v for k, v in rule.items() if v is not None})
                except os_exc.ConflictException:
                    pass  # the same rule, added by a racing run
        return sg.id

    # -- releases ------------------------------------------------------------------------
    def _to_release(self, image) -> Release | None:
        # provenance and accuracy_floor too (I4/I5); Release.from_properties parses them all
        return Release.from_properties(image.id, image.name or "", dict(image.properties or {}),
                                       created_at=image.created_at or "")

    def list_releases(self) -> list[Release]:
        """Every active Glance image carrying modelserve_release, newest first."""
        with self._errors("listing images"):
            images = list(self.conn.image.images())
        out = [r for r in (self._to_release(i) for i in images
                           if i.status == "active") if r is not None]
        return by_newest(out)

    def find_release(self, release: str) -> Release | None:
        """The image of one release, or None."""
        return next((r for r in self.list_releases() if r.release == release), None)

    def delete_release(self, release: Release, *, ignore_missing: bool = True) -> None:
        """Delete the Glance image."""
        with self._errors(f"deleting image {release.name}"):
            self.conn.image.delete_image(release.id, ignore_missing=ignore_missing)

    # -- instances -----------------------------------------------------------------------
    def _ports_by_device(self, device_id: str | None = None) -> dict[str, str]:
        with self._errors("listing ports"):
            ports = (self.conn.network.ports(device_id=device_id) if device_id
                     else self.conn.network.ports())
            out: dict[str, str] = {}
            for p in ports:
                if p.device_id and (p.device_owner or "").startswith("compute:"):
                    out.setdefault(p.device_id, p.id)
            return out

    def _to_instance(self, server, ports: dict[str, str]) -> Instance | None:
        meta = dict(server.metadata or {})
        labels = {k: str(meta.get(META + k, "")) for k in INSTANCE_LABELS}
        if not labels["env"] or server.status in _GONE:
            return None
        address = None
        for addrs in (server.addresses or {}).values():
            for a in addrs:
                if a.get("version") == 4 and a.get("OS-EXT-IPS:type", "fixed") == "fixed":
                    address = a["addr"]
                    break
            if address:
                break
        port = ports.get(server.id)
        status = server.status
        if status == "ACTIVE":
            norm = RUNNING if address and port else BUILDING
        elif status == "ERROR":
            norm = ERROR
        elif status in ("SHUTOFF", "STOPPED", "SUSPENDED", "PAUSED", "SHELVED",
                        "SHELVED_OFFLOADED"):
            norm = STOPPED
        else:
            norm = BUILDING
        fault = ((server.fault or {}).get("message") or "ERROR") if norm == ERROR else ""
        return Instance(
            id=server.id, name=server.name, env=labels["env"], release=labels["release"],
            colour=labels["colour"], role=labels["role"], deploy_id=labels["deploy_id"],
            status=norm, address=address, port=port, created_at=labels["created_at"],
            model_sha256=labels["model_sha256"], fault=fault)

    def list_instances(self, env: str | None) -> list[Instance]:
        """Rollout's servers (of ``env``, or all), any status, oldest first."""
        tag = env_tag(env) if env is not None else TAG
        with self._errors("listing servers"):
            servers = list(self.conn.compute.servers(details=True, tags=tag))
        ports = self._ports_by_device() if servers else {}
        out = [i for i in (self._to_instance(s, ports) for s in servers) if i is not None]
        if env is not None:
            out = [i for i in out if i.env == env]
        return sorted(out, key=lambda i: (i.created_at, i.name))

    def get_instance(self, instance_id: str) -> Instance:
        """One server by id, or NotFound."""
        with self._errors(f"reading server {instance_id}"):
            server = self.conn.compute.get_server(instance_id)
        inst = self._to_instance(server, self._ports_by_device(server.id))
        if inst is None:
            raise NotFound(f"server {instance_id} is not a modelserve server (or is deleted)")
        return inst

    def create_instance(self, spec: InstanceSpec) -> Instance:
        """Boot a server from the release image with the seed as user_data."""
        env = str(spec.labels.get("env", ""))
        flavor_name = spec.flavor or self.flavor
        with self._errors(f"finding flavor {flavor_name}"):
            flavor = self.conn.compute.find_flavor(flavor_name, ignore_missing=False)
        kwargs = dict(
            name=spec.name, image_id=spec.release.id, flavor_id=flavor.id,
            networks=[{"uuid": self._network_id()}],
            user_data=base64.b64encode(spec.user_data.encode()).decode(),
            metadata={META + k: str(spec.labels.get(k, "")) for k in INSTANCE_LABELS},
            tags=[TAG, env_tag(env)],
            security_groups=self._security_groups(str(spec.labels.get("role", "front"))),
        )
        if self.keypair:
            kwargs["key_name"] = self.keypair
        try:
            with self._errors(f"creating server {spec.name} from {spec.release.name}"):
                server = self.conn.compute.create_server(**kwargs)
        except BaseException:
            # the POST may have succeeded before the error (or Ctrl-C): leave nothing behind
            self._delete_by_name(spec.name)
            raise
        inst = self._to_instance(server, {})
        if inst is None:  # the create response carries no metadata in some microversions
            return Instance(id=server.id, name=spec.name, env=env,
                            release=str(spec.labels.get("release", "")),
                            colour=str(spec.labels.get("colour", "")),
                            role=str(spec.labels.get("role", "")),
                            deploy_id=str(spec.labels.get("deploy_id", "")), status=BUILDING,
                            created_at=str(spec.labels.get("created_at", "")),
                            model_sha256=str(spec.labels.get("model_sha256", "")))
        return inst

    def _delete_by_name(self, name: str) -> None:
        try:
            with self._errors(f"removing half-created server {name}"):
                for server in self.conn.compute.servers(name=f"^{name}$"):
                    self.conn.compute.delete_server(server.id, ignore_missing=True)
        except Exception:  # noqa: BLE001 - the original error matters more; cleanup lists it
            pass

    def delete_instance(self, instance_id: str, *, ignore_missing: bool = True) -> None:
        """Delete the server (Nova stops it first)."""
        with self._errors(f"deleting server {instance_id}"):
            self.conn.compute.delete_server(instance_id, ignore_missing=ignore_missing)

    # -- floating IP -----------------------------------------------------------------------
    def _to_fip(self, ip) -> FloatingIP:
        tags = list(ip.tags or [])
        env = next((t[len("modelserve-env-"):] for t in tags
                    if t.startswith("modelserve-env-")), "")
        history = []
        for t in tags:
            if t.startswith(HISTORY_TAG):
                seq, _, body = t[len(HISTORY_TAG):].partition(":")
                history.append((seq, HistoryEvent.decode(body)))
        history.sort(key=lambda x: x[0])
        return FloatingIP(
            id=ip.id, address=ip.floating_ip_address, env=env, target=ip.port_id or None,
            revision=str(ip.revision_number), state=FipState.decode(ip.description),
            history=tuple(e for _, e in history))

    def find_floating_ip(self, env: str) -> FloatingIP | None:
        """The floating IP tagged with the environment, or None (the oldest if two)."""
        with self._errors(f"finding the floating IP of env {env}"):
            ips = list(self.conn.network.ips(tags=env_tag(env)))
        if not ips:
            return None
        ips.sort(key=lambda i: (i.created_at or "", i.id))
        return self._to_fip(ips[0])

    def create_floating_ip(self, env: str, address: str | None = None) -> FloatingIP:
        """Allocate from the external network and tag it, under the env's creation mutex;
        Conflict if the env already has one (another run created it first)."""
        with self._creation_mutex(env):
            if self.find_floating_ip(env) is not None:
                raise Conflict(f"floating IP of env {env} was created concurrently; use it")
            kwargs = {"floating_network_id": self._external_id(),
                      "description": FipState().encode()}
            if address:
                kwargs["floating_ip_address"] = address
            with self._errors(f"allocating a floating IP for env {env}"):
                ip = self.conn.network.create_ip(**kwargs)
            try:
                with self._errors(f"tagging floating IP {ip.floating_ip_address}"):
                    self.conn.network.set_tags(ip, [TAG, env_tag(env)])
                found = self.find_floating_ip(env)
            except BaseException:
                self._release_quietly(ip.id)
                raise
        if found is None or found.id != ip.id:
            self._release_quietly(ip.id)
            raise Conflict(f"floating IP of env {env} was created concurrently; retry")
        return found

    @contextmanager
    def _creation_mutex(self, env: str) -> Iterator[None]:
        """Serialise the creation of env's floating IP (invariant I11).

        Neutron orders floating IPs by a created_at of one-second resolution, so "the oldest
        tagged IP wins" let two racing runs each see itself first. Neutron refuses a second
        port with the same MAC address on a network (409): a port on the project network whose
        MAC is derived from the env name is an atomic mutex. A holder older than
        MUTEX_STALE_S (a run killed between create and delete) is broken."""
        net, mac = self._network_id(), mutex_mac(env)
        name = f"modelserve-mutex-{env}"
        deadline = time.monotonic() + MUTEX_WAIT_S
        while True:
            with self._errors(f"taking the floating-IP mutex of env {env}"):
                try:
                    port = self.conn.network.create_port(network_id=net, mac_address=mac,
                                                         name=name, fixed_ips=[])
                    break
                except os_exc.ConflictException:  # held: by a live run, or a stale one
                    self._break_stale_mutex(net, mac)
            if time.monotonic() > deadline:
                raise TransientCloudError(f"the floating-IP mutex of env {env} ({name}) is "
                                          f"held for over {MUTEX_WAIT_S:.0f} s; retry")
            time.sleep(random.uniform(0.1, 0.3))
        try:
            yield
        finally:
            with suppress(Exception):  # a leftover is broken by the next run once stale
                self.conn.network.delete_port(port.id, ignore_missing=True)

    def _break_stale_mutex(self, net: str, mac: str) -> None:
        for port in self.conn.network.ports(network_id=net, mac_address=mac):
            if _age_s(port.created_at) > MUTEX_STALE_S:
                self.conn.network.delete_port(port.id, ignore_missing=True)

    def _release_quietly(self, fip_id: str) -> None:
        try:
            with self._errors(f"releasing floating IP {fip_id}"):
                self.conn.network.delete_ip(fip_id, ignore_missing=True)
        except Exception:  # noqa: BLE001 - best effort; cleanup finds untagged leftovers
            pass

    def update_floating_ip(self, fip: FloatingIP, *, target: str | None, state: FipState,
                           if_revision: str) -> FloatingIP:
        """One PUT of port_id + description with If-Match: revision_number."""
        with self._errors(f"updating floating IP {fip.address} (env {fip.env})"):
            ip = self.conn.network.update_ip(fip.id, port_id=target,
                                             description=state.encode(),
                                             if_revision=int(if_revision))
        return self._to_fip(ip)

    def record_event(self, fip: FloatingIP, event: HistoryEvent) -> None:
        """Add an ``h:<seq>:<event>`` tag, dropping the oldest beyond HISTORY_KEEP."""
        with self._errors(f"recording history on floating IP {fip.address}"):
            ip = self.conn.network.get_ip(fip.id)
            tags = list(ip.tags or [])
            hist = sorted(t for t in tags if t.startswith(HISTORY_TAG))
            seq = int(hist[-1][len(HISTORY_TAG):].split(":", 1)[0]) + 1 if hist else 1
            hist.append(f"{HISTORY_TAG}{seq:06d}:{event.encode()}"[:255])
            keep = [t for t in tags if not t.startswith(HISTORY_TAG)] + hist[-HISTORY_KEEP:]
            self.conn.network.set_tags(ip, keep)

    def delete_floating_ip(self, fip: FloatingIP, *, ignore_missing: bool = True) -> None:
        """Release the floating IP."""
        with self._errors(f"releasing floating IP {fip.address}"):
            self.conn.network.delete_ip(fip.id, ignore_missing=ignore_missing)


def _auth_text(what: str, exc: BaseException, code: int | None = None) -> str:
    code = code or getattr(exc, "http_status", None) or getattr(exc, "status_code", None)
    kind = "authorisation" if code == 403 else "authentication"
    return (f"{what}: {kind} failed" + (f" (HTTP {code})" if code else "") + f": {_short(exc)}; "
            "check the credentials of OS_CLOUD (clouds.yaml / OS_* variables); not retried")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300]
