"""Talking HTTP to the app: the health gate, the post-switch check, and the load probe.

The gate asks each green front directly (not through the floating IP): ``/readyz`` must be
200; ``/version`` must report the identity the image itself holds (RELEASE.json: release,
git sha, model sha256), equal to the image's properties (I8), plus the deploy and colour this
seed gave it; a real prediction must answer with the image's model sha256; and every worker
instance must be seen on the front's broker serving that model (``check_workers``, I7).
"Not yet" (connection refused, 503) raises ``NotReady`` and is retried by a named policy; a
wrong answer raises ``HealthCheckFailed`` at once (waiting will not fix a wrong model).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import requests

from rollout.clouds.base import APP_PORT, Release
from rollout.errors import HealthCheckFailed
from rollout.retry import NotReady

SAMPLE = {"instances": [{"npreg": 1, "glu": 89, "bp": 66, "skin": 23, "bmi": 28.1,
                         "ped": 0.167, "age": 21}]}
_SAMPLE_BODY = json.dumps(SAMPLE).encode()
TIMEOUT = (2.0, 10.0)  # connect, read


def base_url(address: str, port: int = APP_PORT) -> str:
    """``http://address:port``."""
    return f"http://{address}:{port}"


def _get(url: str, what: str) -> requests.Response:
    try:
        return requests.get(url, timeout=TIMEOUT, headers={"Connection": "close"})
    except requests.RequestException as exc:
        raise NotReady(f"{what}: {type(exc).__name__}") from exc


def _identity_mismatch(version: dict, release: Release) -> str | None:
    """Why /version (what the image holds: RELEASE.json) disagrees with the image's
    properties, or None. A release baked by packer/bake.py must report its RELEASE.json."""
    image = version.get("image")
    if release.is_baked_release and not isinstance(image, dict):
        return ("reports no RELEASE.json (\"image\": null" + (
            f", {version['image_error']}" if version.get("image_error") else "")
            + "): the image was not baked by packer/bake.py")
    claims = {"release": version.get("release"), "model_sha256": version.get("model_sha256")}
    if isinstance(image, dict):
        claims.update({"release": image.get("release"), "git_sha": image.get("git_sha"),
                       "image model_sha256": image.get("model_sha256")})
    elif release.is_baked_release or version.get("git_sha") is not None:
        claims["git_sha"] = version.get("git_sha")
    want = {"release": release.release, "model_sha256": release.model_sha256,
            "image model_sha256": release.model_sha256, "git_sha": release.git_sha}
    for key, got in claims.items():
        if key == "git_sha" and not release.git_sha:
            continue
        if got != want[key]:
            return f"says {key} {str(got)[:40]!r}, the image's properties say {want[key][:40]!r}"
    return None


def check_front(address: str, *, release: str | Release, model_sha256: str = "",
                deploy_id: str = "", name: str = "", port: int = APP_PORT,
                colour: str = "") -> dict:
    """One health-gate attempt on a front; returns its /version on success.

    ``release`` is the image's Release (invariant I8: /version's release, git sha and model
    sha256, read from the image's own RELEASE.json, must equal the image's properties) or,
    for old callers, a release name (then only the name and ``model_sha256`` are checked).
    ``deploy_id`` and ``colour`` prove the seed applied.
    """
    url = base_url(address, port)
    who = name or address
    rel_name = release.release if isinstance(release, Release) else release
    model_sha256 = model_sha256 or (release.model_sha256 if isinstance(release, Release) else "")
    r = _get(f"{url}/readyz", f"{who} /readyz")
    if r.status_code != 200:
        raise NotReady(f"{who} /readyz {r.status_code}: {r.text[:200].strip()}")
    r = _get(f"{url}/version", f"{who} /version")
    if r.status_code != 200:
        raise NotReady(f"{who} /version {r.status_code}")
    version = r.json()
    if version.get("release") != rel_name:
        raise HealthCheckFailed(
            f"{who} says release {version.get('release')!r}, expected {rel_name!r}: the image "
            "or its seed is wrong")
    if isinstance(release, Release):
        why = _identity_mismatch(version, release)
        if why:
            raise HealthCheckFailed(f"{who} {why}: refusing to switch to an image that is not "
                                    "what its properties claim")
    if version.get("seed_release") not in (None, rel_name):
        raise HealthCheckFailed(f"{who} was seeded for release {version['seed_release']!r} "
                                f"but runs {rel_name!r}: launched from the wrong image")
    if deploy_id and version.get("deploy_id") != deploy_id:
        raise HealthCheckFailed(
            f"{who} says deploy {version.get('deploy_id')!r}, expected {deploy_id!r}: its seed "
            "did not apply")
    if colour and version.get("colour") and version["colour"] != colour:
        raise HealthCheckFailed(f"{who} says colour {version['colour']}, expected {colour}: "
                                "its seed did not apply")
    try:
        r = requests.post(f"{url}/api/v1/predictions", json=SAMPLE, timeout=TIMEOUT,
                          headers={"Connection": "close"})
    except requests.RequestException as exc:
        raise NotReady(f"{who} prediction: {type(exc).__name__}") from exc
    if r.status_code >= 500:
        raise NotReady(f"{who} prediction {r.status_code}: {r.text[:200].strip()}")
    if r.status_code != 200:
        raise HealthCheckFailed(f"{who} prediction {r.status_code}: {r.text[:200].strip()}")
    body = r.json()
    preds = body.get("predictions") or []
    if len(preds) != 1 or not 0.0 <= float(preds[0].get("probability", -1)) <= 1.0 \
            or preds[0].get("label") not in (0, 1):
        raise HealthCheckFailed(f"{who} prediction is malformed: {str(body)[:200]}")
    got = (body.get("model") or {}).get("sha256")
    if got != model_sha256:
        raise HealthCheckFailed(
            f"{who} serves model sha256 {str(got)[:12]}…, the image says "
            f"{model_sha256[:12]}…: refusing to switch")
    return version


def _same_instance(entry: dict, name: str) -> bool:
    """A /api/v1/workers entry is instance ``name`` (a hostname may carry a domain)."""
    for host in (str(entry.get("instance") or ""), str(entry.get("node") or "").partition("@")[2]):
        if host == name or host.split(".", 1)[0] == name:
            return True
    return False


def check_workers(address: str, port: int = APP_PORT, names: Sequence[str] = (),
                  model_sha256: str = "", *, front: str = "") -> list[dict]:
    """One attempt of the worker gate (invariant I7): every worker instance in ``names`` must
    be seen on the front's broker (the front's /api/v1/workers) serving ``model_sha256``.

    Not all seen yet (or the front/broker not answering): ``NotReady``. A named worker seen
    with another model, or a front that cannot list its workers: ``HealthCheckFailed``.
    Returns the entries of the named workers.
    """
    if not names:
        return []
    who = front or address
    r = _get(f"{base_url(address, port)}/api/v1/workers", f"{who} /api/v1/workers")
    if r.status_code == 404:
        raise HealthCheckFailed(f"{who} cannot list its workers (/api/v1/workers 404): the "
                                "image predates worker gating; rebake it")
    if r.status_code != 200:
        raise NotReady(f"{who} /api/v1/workers {r.status_code}: {r.text[:200].strip()}")
    try:
        entries = [e for e in r.json().get("workers") or [] if isinstance(e, dict)]
    except (ValueError, AttributeError) as exc:
        raise HealthCheckFailed(f"{who} /api/v1/workers is not a JSON object") from exc
    seen, missing = [], []
    for name in names:
        mine = [e for e in entries if _same_instance(e, name)]
        if not mine:
            missing.append(name)
            continue
        wrong = [e for e in mine if e.get("model_sha256") != model_sha256]
        if wrong:
            raise HealthCheckFailed(
                f"worker {name} serves model sha256 {str(wrong[0].get('model_sha256'))[:12]}… "
                f"on {who}'s broker, the image says {model_sha256[:12]}…: refusing to switch")
        seen += mine
    if missing:
        raise NotReady(f"workers not yet serving on {who}'s broker: {', '.join(missing)}")
    return seen


def fetch_version(address: str, port: int = APP_PORT) -> dict:
    """GET /version on a new connection (through the floating IP after a switch)."""
    r = _get(f"{base_url(address, port)}/version", f"{address} /version")
    if r.status_code != 200:
        raise NotReady(f"{address} /version {r.status_code}")
    return r.json()


@dataclass
class ProbeResult:
    """What the load probe saw."""

    total: int = 0
    failed: int = 0
    by_release: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    latencies: list = field(default_factory=list)  # seconds of each answered request (200)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"total": self.total, "failed": self.failed,
                "by_release": dict(self.by_release), "errors": dict(self.errors.most_common(5)),
                "seconds": round(self.seconds, 3)}


class Probe:
    """A bounded load generator against the floating IP while a switch happens.

    ``threads`` clients loop GET /version and POST a prediction, each request on a new
    connection (so a switch is seen as soon as it happens), until ``stop()``, ``max_requests``
    or ``max_seconds`` — whichever comes first. Only the floating IP is targeted.
    """

    def __init__(self, address: str, *, port: int = APP_PORT, threads: int = 2,
                 max_requests: int = 20000, max_seconds: float = 120.0, pause: float = 0.02,
                 timeout: float = 5.0):
        self._host, self._port = address, port
        self.timeout = timeout
        self.threads, self.max_requests, self.max_seconds = threads, max_requests, max_seconds
        self.pause = pause
        self.result = ProbeResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._t0 = 0.0

    def _send(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One request on a new connection (``http.client``: about a quarter of ``requests``'
        CPU per request, which matters on a small machine where the probe shares the cores with the
        cloud API that is switching the floating IP)."""
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        try:
            headers = {"Connection": "close"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def _one(self, n: int) -> None:
        t0 = time.monotonic()
        try:
            if n % 2:
                status, _ = self._send("POST", "/api/v1/predictions", _SAMPLE_BODY)
                release = None
            else:
                status, data = self._send("GET", "/version")
                release = json.loads(data).get("release") if status == 200 else None
            ok = status == 200
            err = None if ok else f"HTTP {status}"
        except (OSError, http.client.HTTPException, ValueError, AttributeError) as exc:
            ok, release, err = False, None, type(exc).__name__
        took = time.monotonic() - t0
        with self._lock:
            self.result.total += 1
            if ok:
                self.result.latencies.append(took)
            if not ok:
                self.result.failed += 1
                self.result.errors[err] += 1
            if release:
                self.result.by_release[release] += 1

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            with self._lock:
                if self.result.total >= self.max_requests:
                    return
            if time.monotonic() - self._t0 > self.max_seconds:
                return
            self._one(n)
            n += 1
            time.sleep(self.pause)

    def start(self) -> Probe:
        """Start the client threads."""
        self._t0 = time.monotonic()
        for i in range(self.threads):
            t = threading.Thread(target=self._loop, name=f"probe-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def wait_seen(self, which, count: int = 2, *, sleep=time.sleep, at_most: float = 0.15,
                  step: float = 0.01) -> bool:
        """Wait until /version answered ``count`` times from releases ``which(name)`` accepts
        (e.g. the old release before a switch, the new one after it: each client then has
        seen it, a prediction in between), at most ``at_most`` seconds, in ``sleep`` steps of
        ``step``. True if seen (else the bound was reached)."""
        for _ in range(max(1, round(at_most / step))):
            with self._lock:
                if sum(n for r, n in self.result.by_release.items() if which(r)) >= count:
                    return True
            sleep(step)
        return False

    def snapshot(self) -> ProbeResult:
        """A copy of the counts so far (the probe keeps running)."""
        with self._lock:
            r = self.result
            return ProbeResult(r.total, r.failed, Counter(r.by_release), Counter(r.errors),
                               time.monotonic() - self._t0, list(r.latencies))

    def stop(self) -> ProbeResult:
        """Stop, wait for in-flight requests, return the counts."""
        self._stop.set()
        for t in self._workers:
            t.join(timeout=15)
        self.result.seconds = time.monotonic() - self._t0
        return self.result

    def __enter__(self) -> Probe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
