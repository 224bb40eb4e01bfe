"""Talking HTTP to the app: the health gate, the post-switch check, and the load probe.

The gate asks each green front directly (not through the floating IP): ``/readyz`` must be
200, ``/version`` must name the release and deploy this seed gave it, and a real prediction
must answer with the image's model sha256. "Not yet" (connection refused, 503) raises
``NotReady`` and is retried by a named policy; a wrong answer raises ``HealthCheckFailed``
at once (waiting will not fix a wrong model).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import requests

from rollout.clouds.base import APP_PORT
from rollout.errors import HealthCheckFailed
from rollout.retry import NotReady

SAMPLE = {"instances": [{"npreg": 1, "glu": 89, "bp": 66, "skin": 23, "bmi": 28.1,
                         "ped": 0.167, "age": 21}]}
TIMEOUT = (2.0, 10.0)  # connect, read


def base_url(address: str, port: int = APP_PORT) -> str:
    """``http://address:port``."""
    return f"http://{address}:{port}"


def _get(url: str, what: str) -> requests.Response:
    try:
        return requests.get(url, timeout=TIMEOUT, headers={"Connection": "close"})
    except requests.RequestException as exc:
        raise NotReady(f"{what}: {type(exc).__name__}") from exc


def check_front(address: str, *, release: str, model_sha256: str, deploy_id: str = "",
                name: str = "", port: int = APP_PORT) -> dict:
    """One health-gate attempt on a front; returns its /version on success."""
    url = base_url(address, port)
    who = name or address
    r = _get(f"{url}/readyz", f"{who} /readyz")
    if r.status_code != 200:
        raise NotReady(f"{who} /readyz {r.status_code}: {r.text[:200].strip()}")
    r = _get(f"{url}/version", f"{who} /version")
    if r.status_code != 200:
        raise NotReady(f"{who} /version {r.status_code}")
    version = r.json()
    if version.get("release") != release:
        raise HealthCheckFailed(
            f"{who} says release {version.get('release')!r}, expected {release!r}: the image "
            "or its seed is wrong")
    if deploy_id and version.get("deploy_id") != deploy_id:
        raise HealthCheckFailed(
            f"{who} says deploy {version.get('deploy_id')!r}, expected {deploy_id!r}: its seed "
            "did not apply")
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
                 max_requests: int = 20000, max_seconds: float = 120.0, pause: float = 0.005):
        self.url = base_url(address, port)
        self.threads, self.max_requests, self.max_seconds = threads, max_requests, max_seconds
        self.pause = pause
        self.result = ProbeResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._t0 = 0.0

    def _one(self, n: int) -> None:
        try:
            if n % 2:
                r = requests.post(f"{self.url}/api/v1/predictions", json=SAMPLE, timeout=5,
                                  headers={"Connection": "close"})
                ok = r.status_code == 200
                release = None
            else:
                r = requests.get(f"{self.url}/version", timeout=5,
                                 headers={"Connection": "close"})
                ok = r.status_code == 200
                release = r.json().get("release") if ok else None
            err = None if ok else f"HTTP {r.status_code}"
        except (requests.RequestException, ValueError) as exc:
            ok, release, err = False, None, type(exc).__name__
        with self._lock:
            self.result.total += 1
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
