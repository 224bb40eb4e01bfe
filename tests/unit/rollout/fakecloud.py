"""A stateful in-memory ``Cloud`` whose instances answer real HTTP on loopback addresses.

Each instance gets its own 127.0.0.N address with a tiny app speaking the contract's
/readyz, /version and prediction routes (from the seed it was given); the floating IP is
another loopback address whose server forwards each request to the current target's app.
Faults: ``fail[method] = [exc, ...]`` raises those on the next calls of that method.
Like Neutron, two ``create_floating_ip`` for one env both succeed (the second goes to
``dup_fips``); ``find_floating_ip`` answers the first (lowest id), deterministically. State
changes are atomic (one mutex), so threads can race the tool's compare-and-swap.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rollout.clouds.base import (
    RUNNING,
    CloudBase,
    FipState,
    FloatingIP,
    HistoryEvent,
    Instance,
    InstanceSpec,
    Release,
    by_newest,
)
from rollout.errors import CloudError, Conflict, NotFound
from rollout.seed import parse_user_data

_hosts = itertools.count(10)


def _next_address() -> str:
    """A fresh loopback address (127.0.0.10 onwards, across 127.0.0.0/8)."""
    n = next(_hosts)
    while n & 255 in (0, 255):
        n = next(_hosts)
    return f"127.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """The contract's routes for one fake instance."""

    def __init__(self, env: dict[str, str], sha: str, ready: bool = True, workers=None,
                 image: dict | None = None):
        self.env, self.sha, self.ready, self.image = env, sha, ready, image
        self.workers = workers or (lambda: [])
        self.degrade_at: float | None = None  # monotonic time it turns bad
        self.degrade_mode = ""  # "fail": 500 on every route; "slow": sleep before answering
        self.slow_s = 0.3
        self.counts: dict[tuple[str, int], int] = {}
        self.mu = threading.Lock()
        self.probability = 0.3  # every prediction's (label: >= 0.5)
        self.predict_fail = 0  # answer predictions with this HTTP status (0: answer)
        self.holdout: list[dict] | None = None  # GET /api/v1/model/holdout rows (None: 404)

    def degrade(self, mode: str, after_s: float = 0.0, slow_s: float = 0.3) -> None:
        """Turn failing (HTTP 500) or slow ``after_s`` seconds from now."""
        self.degrade_mode, self.slow_s = mode, slow_s
        self.degrade_at = time.monotonic() + after_s

    def answer(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
        if path == "/metrics":
            with self.mu:
                lines = [f'modelserve_http_requests_total{{method="GET",route="{r}",'
                         f'status="{c}"}} {n}.0' for (r, c), n in sorted(self.counts.items())]
            return 200, "\n".join(lines) + "\n"
        code, out = self._answer(method, path, body)
        with self.mu:
            self.counts[(path, code)] = self.counts.get((path, code), 0) + 1
        return code, out

    def _answer(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
        if self.degrade_at is not None and time.monotonic() >= self.degrade_at:
            if self.degrade_mode == "fail":
                return 500, {"error": "degraded"}
            time.sleep(self.slow_s)
        if path == "/readyz":
            return (200, {"status": "ready"}) if self.ready else (503, {"failed": "model"})
        if path == "/version":
            e = self.env
            return 200, {"release": e["MODELSERVE_RELEASE"], "colour": e["MODELSERVE_COLOUR"],
                         "role": e["MODELSERVE_ROLE"], "deploy_id": e["MODELSERVE_DEPLOY_ID"],
                         "model_sha256": self.sha, "image": self.image}
        if path == "/api/v1/workers":
            return 200, {"workers": self.workers()}
        if method == "POST" and path == "/api/v1/predictions":
            if self.predict_fail:
                return self.predict_fail, {"error": "prediction failed"}
            try:
                n = len(json.loads(body or b"{}").get("instances", [])) or 1
            except (ValueError, AttributeError):
                n = 1
            p = self.probability
            return 200, {"predictions": [{"probability": p, "label": int(p >= 0.5)}] * n,
                         "model": {"version": "1", "sha256": self.sha}}
        if path == "/api/v1/model/holdout" and self.holdout is not None:
            return 200, {"rows": self.holdout, "version": "1"}
        return 404, {"error": "not found"}


def serve(address: str, port: int, route, with_body: bool = False) -> ThreadingHTTPServer:
    """A threaded HTTP server on address:port answering with ``route(method, path)``
    (``route(method, path, body)`` when ``with_body``)."""

    class Handler(BaseHTTPRequestHandler):
        def _go(self, method: str) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(n) if n else b""
            code, body = route(method, self.path, data) if with_body else route(method, self.path)
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            self._go("GET")

        def do_POST(self):  # noqa: N802
            self._go("POST")

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer((address, port), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    return srv


class FakeCloud(CloudBase):
    """The Cloud protocol in memory, with real HTTP endpoints on loopback."""

    name = "fake"

    def __init__(self, releases: list[Release], port: int):
        self.releases = by_newest(releases)
        self.port = port
        self.instances: dict[str, Instance] = {}
        self.apps: dict[str, App] = {}
        self.servers: dict[str, ThreadingHTTPServer] = {}
        self.fips: dict[str, FloatingIP] = {}
        self.dup_fips: dict[str, FloatingIP] = {}  # id -> a second FIP of an env (a race)
        self.mu = threading.RLock()
        self.fip_servers: dict[str, ThreadingHTTPServer] = {}
        self.fail: dict[str, list[BaseException]] = {}
        self.unready_releases: set[str] = set()
        self.probabilities: dict[str, float] = {}  # release -> its fronts' prediction
        self.calls: list[str] = []
        self.sleep = lambda s: None

    def _maybe_fail(self, method: str) -> None:
        with self.mu:
            self.calls.append(method)
            queue = self.fail.get(method)
            exc = queue.pop(0) if queue else None
        if exc is not None:
            raise exc

    def close(self) -> None:
        for srv in list(self.servers.values()) + list(self.fip_servers.values()):
            srv.shutdown()
            srv.server_close()

    # releases
    def list_releases(self):
        self._maybe_fail("list_releases")
        return list(self.releases)

    def find_release(self, release):
        self._maybe_fail("find_release")
        return next((r for r in self.releases if r.release == release), None)

    def delete_release(self, release, *, ignore_missing=True):
        self._maybe_fail("delete_release")
        self.releases = [r for r in self.releases if r.id != release.id]

    # instances
    def list_instances(self, env):
        self._maybe_fail("list_instances")
        return [i for i in self.instances.values() if env is None or i.env == env]

    def find_instance(self, instance_id):
        self._maybe_fail("find_instance")
        return self.instances.get(instance_id)

    def get_instance(self, instance_id):
        self._maybe_fail("get_instance")
        try:
            return self.instances[instance_id]
        except KeyError:
            raise NotFound(f"no instance {instance_id}") from None

    def create_instance(self, spec: InstanceSpec):
        self._maybe_fail("create_instance")
        if spec.name in self.instances:
            raise Conflict(f"{spec.name} exists")
        address = spec.address or _next_address()  # pinned when picked beforehand
        inst = Instance(id=f"id-{spec.name}", name=spec.name, env=spec.labels["env"],
                        release=spec.labels["release"], colour=spec.labels["colour"],
                        role=spec.labels["role"], deploy_id=spec.labels["deploy_id"],
                        status=RUNNING, address=address, port=f"port-{address}",
                        created_at=spec.labels["created_at"],
                        model_sha256=spec.labels["model_sha256"])
        self.instances[inst.id] = inst
        env = parse_user_data(spec.user_data)
        deploy_id = spec.labels["deploy_id"]

        def workers() -> list[dict]:
            return [{"node": f"modelserve-worker-1@{w.name}", "instance": w.name,
                     "model_sha256": self.apps[w.id].sha}
                    for w in list(self.instances.values())
                    if w.role == "worker" and w.deploy_id == deploy_id and w.status == RUNNING
                    and w.id in self.apps]

        app = App(env, spec.release.model_sha256,
                  ready=spec.release.release not in self.unready_releases, workers=workers,
                  image={"release": spec.release.release, "git_sha": spec.release.git_sha,
                         "model_sha256": spec.release.model_sha256,
                         "provenance": spec.release.provenance})
        app.probability = self.probabilities.get(inst.release, app.probability)
        self.apps[inst.id] = app
        if inst.role == "front":
            self.servers[inst.id] = serve(address, self.port, app.answer, with_body=True)
        return inst

    def delete_instance(self, instance_id, *, ignore_missing=True):
        self._maybe_fail("delete_instance")
        if instance_id not in self.instances:
            if ignore_missing:
                return
            raise NotFound(instance_id)
        del self.instances[instance_id]
        self.apps.pop(instance_id, None)
        srv = self.servers.pop(instance_id, None)
        if srv:
            srv.shutdown()
            srv.server_close()

    # floating IP
    def find_floating_ip(self, env):
        self._maybe_fail("find_floating_ip")
        with self.mu:
            return self.fips.get(env)

    def floating_ips(self, env) -> list[FloatingIP]:
        """Every floating IP of ``env`` (tests: there must be at most one)."""
        with self.mu:
            return ([self.fips[env]] if env in self.fips else []) + [
                f for f in self.dup_fips.values() if f.env == env]

    def create_floating_ip(self, env, address=None):
        self._maybe_fail("create_floating_ip")
        address = address or _next_address()
        with self.mu:
            if env in self.fips:  # a racing second allocation (Neutron allows it)
                fip = FloatingIP(id=f"fip-{env}-{next(_hosts)}", address=address, env=env,
                                 target=None, revision="1")
                self.dup_fips[fip.id] = fip
                return fip
            fip = FloatingIP(id=f"fip-{env}", address=address, env=env, target=None,
                             revision="1")
            self.fips[env] = fip

        def route(method: str, path: str, body: bytes = b""):
            cur = self.fips.get(env)
            target = next((i for i in self.instances.values()
                           if cur and i.port == cur.target), None)
            if target is None:
                return 502, {"error": "no target"}
            return self.apps[target.id].answer(method, path, body)

        self.fip_servers[env] = serve(address, self.port, route, with_body=True)
        return fip

    def update_floating_ip(self, fip, *, target, state: FipState, if_revision):
        self._maybe_fail("update_floating_ip")
        with self.mu:
            if fip.id in self.dup_fips:
                cur, store = self.dup_fips[fip.id], self.dup_fips
                key = fip.id
            else:
                cur = self.fips.get(fip.env)
                if cur is None or cur.id != fip.id:
                    raise NotFound(f"no floating IP {fip.id}")
                store, key = self.fips, fip.env
            if cur.revision != if_revision:
                raise Conflict(f"revision {cur.revision} != {if_revision}")
            if target and any(f.target == target and f.id != cur.id
                              for f in [*self.fips.values(), *self.dup_fips.values()]):
                # Neutron: one floating IP per fixed IP and external network (permanent 409)
                raise CloudError(f"port {target} already has a floating IP")
            new = replace(cur, target=target, state=state, revision=str(int(cur.revision) + 1))
            store[key] = new
            return new

    def record_event(self, fip, event: HistoryEvent):
        self._maybe_fail("record_event")
        with self.mu:
            cur = self.fips[fip.env]
            self.fips[fip.env] = replace(cur, history=(cur.history + (event,))[-20:])

    def delete_floating_ip(self, fip, *, ignore_missing=True):
        self._maybe_fail("delete_floating_ip")
        with self.mu:
            if self.dup_fips.pop(fip.id, None) is not None:
                return
            cur = self.fips.get(fip.env)
            if cur is None or cur.id != fip.id:
                return
            self.fips.pop(fip.env, None)
            srv = self.fip_servers.pop(fip.env, None)
        if srv:
            srv.shutdown()
            srv.server_close()


def fake_releases(names: str = "ab") -> list[Release]:
    """One release image per letter (release ``a`` is ``modelserve-a``, oldest first), all at
    accuracy 0.78 with sha256 ``sha-<letter>``."""
    return [Release(f"img-{r}", f"modelserve-{r}", r, f"sha-{r}", 0.78,
                    built_at=f"2026-01-{n:02d}") for n, r in enumerate(names, 1)]


def ctx_for(cloud: FakeCloud, env: str = "dev", **kw):
    """An executor context on the in-memory cloud: no sleeping, its fronts' port."""
    from rollout import executor

    return executor.Context(cloud=cloud, env=env, sleep=lambda s: None, port=cloud.port, **kw)
