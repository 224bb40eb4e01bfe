"""The web process's diagnostics snapshot: what /readyz, the V2 readiness routes,
/api/v1/workers and /metrics' queue depth answer from.

No request thread talks to the broker for a diagnostic. ONE background thread per web process
(started by the first diagnostic request, a daemon, stopped when the client closes) runs the
checks about once a second, each bounded in time, and replaces the snapshot; a request reads
the last snapshot and reports its age. Were each request to ask the broker itself, a few
dozen clients polling /readyz would hold every pooled broker connection (see app/client.py
for why diagnostics never use Celery's pool at all).

A snapshot older than `stale_after` means the refresher is stuck: readiness then fails with
the check "snapshot", never a stale 200.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from app.dispatch import Unavailable

INTERVAL = 1.0  # seconds from one refresh's start to the next (at least MIN_GAP between them)
MIN_GAP = 0.1
# One refresh is bounded: broker round trip (~2 s at worst), the identity broadcast (1 s of
# collecting replies), the smoke prediction (SMOKE_TIMEOUT), the queue depth (a round trip).
SMOKE_TIMEOUT = 5.0
STALE_AFTER = 15.0  # above the worst refresh plus INTERVAL: older means the refresher is stuck
FIRST_WAIT = 10.0  # how long the first diagnostic request waits for the first snapshot

log = logging.getLogger("modelserve.diagnostics")


@dataclass(frozen=True)
class Snapshot:
    """What one refresh saw. `taken`: time.monotonic() when it finished."""

    taken: float
    checks: dict[str, str]
    failed: str | None  # the first readiness check that failed, None when ready
    workers: list[dict[str, Any]] | None  # None when the broadcast failed (workers_error)
    workers_error: str | None
    queue_depth: int | None
    duration: float = 0.0

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.monotonic() if now is None else now) - self.taken)


class Diagnostics:
    """The refresher of one web process (one per app) and the snapshot it keeps.

    `client` is the app's broker client: check_broker(), workers(), predict(rows, timeout=)
    and queue_depth(). `bundle` gives the smoke row and the sha256 the workers must serve."""

    def __init__(self, client: Any, bundle: Any, interval: float = INTERVAL,
                 stale_after: float = STALE_AFTER, smoke_timeout: float = SMOKE_TIMEOUT,
                 first_wait: float = FIRST_WAIT):
        self.client, self.bundle = client, bundle
        self.interval, self.stale_after, self.smoke_timeout = interval, stale_after, smoke_timeout
        self.first_wait = first_wait
        sample = bundle.metadata["holdout_sample"][0]
        self._smoke_row = [float(sample["features"][n]) for n in bundle.feature_names]
        self._smoke_probability = float(sample["probability"])
        self._snapshot: Snapshot | None = None
        self._first = threading.Event()
        self._stopped = threading.Event()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        on_close = getattr(client, "on_close", None)
        if callable(on_close):
            on_close(self.stop)

    # --- readers (request threads): never block on the broker --------------------------------

    def current(self) -> Snapshot | None:
        """The last snapshot (starting the refresher if it is not running); before the first
        one, wait up to `first_wait` seconds for it. None if there is none yet."""
        self.start()
        if self._snapshot is None and self.first_wait > 0:
            self._first.wait(self.first_wait)
        return self._snapshot

    def _unusable(self, snap: Snapshot | None) -> str | None:
        """Why ``snap`` must not be answered from (none yet, or too old), else None."""
        if snap is None:
            return ("no diagnostics snapshot yet (the first refresh has not finished within "
                    f"{self.first_wait:g}s)")
        age = snap.age()
        if age > self.stale_after:
            return (f"the diagnostics snapshot is {age:.1f}s old (more than "
                    f"{self.stale_after:g}s): its refresher is stuck")
        return None

    def readiness(self) -> tuple[dict[str, Any], int]:
        """(body, status) of /readyz from the snapshot."""
        snap = self.current()
        why = self._unusable(snap)
        if why is not None:
            body = {"status": "unavailable", "failed": "snapshot", "checks": {"snapshot": why}}
            if snap is not None:
                body["age_s"] = round(snap.age(), 2)
            return body, 503
        age = round(snap.age(), 2)
        if snap.failed is not None:
            return {"status": "unavailable", "failed": snap.failed, "checks": dict(snap.checks),
                    "age_s": age}, 503
        return {"status": "ready", "checks": dict(snap.checks), "age_s": age}, 200

    def workers(self) -> tuple[list[dict[str, Any]], float]:
        """(workers, age) of the snapshot; Unavailable when the last refresh could not
        broadcast to them (or there is no fresh snapshot)."""
        snap = self.current()
        why = self._unusable(snap)
        if why is not None:
            raise Unavailable(why)
        if snap.workers is None:
            raise Unavailable(snap.workers_error or "the workers could not be asked")
        return list(snap.workers), round(snap.age(), 2)

    def queue_depth(self) -> int | None:
        """The snapshot's queue depth; None (unknown) without a fresh snapshot. Never waits:
        a scrape is answered at once."""
        self.start()
        snap = self._snapshot
        return None if self._unusable(snap) is not None else snap.queue_depth

    # --- the refresher --------------------------------------------------------------------

    def start(self) -> None:
        """Start the refresher thread unless it runs (or was stopped)."""
        if self._thread is not None or self._stopped.is_set():
            return
        with self._start_lock:
            if self._thread is None and not self._stopped.is_set():
                thread = threading.Thread(target=self._run, name="modelserve-diagnostics",
                                          daemon=True)
                thread.start()
                self._thread = thread

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the refresher (it finishes the refresh in progress, bounded) and wait for it
        up to `timeout` seconds."""
        self._stopped.set()
        with self._start_lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopped.is_set():
            started = time.monotonic()
            try:
                self._snapshot = self.refresh()
                self._first.set()
            except Exception:  # noqa: BLE001 - the refresher must outlive any one failure
                log.exception("diagnostics refresh failed")
            self._stopped.wait(max(MIN_GAP, self.interval - (time.monotonic() - started)))

    def refresh(self) -> Snapshot:
        """Run every check once (each bounded) and return what they saw.

        Readiness: the broker answers a round trip, a worker answers the identity broadcast,
        the smoke prediction comes from a worker serving this release's model sha256 and
        matches the bundle's probability; the checks stop at the first failure. The workers
        list and the queue depth are taken whatever readiness says."""
        started = time.monotonic()
        client, bundle = self.client, self.bundle
        checks: dict[str, str] = {}
        failed: str | None = None
        workers: list[dict[str, Any]] | None = None
        workers_error: str | None = None

        def fail(check: str, exc: Exception) -> None:
            nonlocal failed
            if not isinstance(exc, Unavailable):
                log.warning("diagnostic %s: %r", check, exc)
            if failed is None:
                failed = check
                checks[check] = str(exc) or type(exc).__name__

        unreachable = False
        try:
            client.check_broker()
            checks["broker"] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure is this check's
            fail("broker", exc)
            unreachable = isinstance(exc, Unavailable)
        if unreachable:  # nothing else to ask the broker: the refresh stays short
            workers_error = checks["broker"]
        else:
            try:
                workers = list(client.workers())
            except Exception as exc:  # noqa: BLE001
                workers_error = str(exc) or type(exc).__name__
                fail("workers", exc)
        if failed is None:
            if workers:
                checks["workers"] = f"{len(workers)} answering"
            else:
                fail("workers", Unavailable("no worker answered the broadcast within 1.0s"))
        if failed is None:
            try:
                probabilities, sha256 = client.predict([self._smoke_row],
                                                       timeout=self.smoke_timeout)
                if sha256 != bundle.sha256:
                    raise Unavailable(f"workers serve model {sha256[:12]}, this release ships "
                                      f"{bundle.sha256[:12]}")
                checks["model"] = f"sha256 {sha256[:12]} loaded"
            except Exception as exc:  # noqa: BLE001
                fail("model", exc)
            else:
                if abs(probabilities[0] - self._smoke_probability) > 1e-4:
                    fail("smoke_prediction", Unavailable(
                        f"smoke prediction {probabilities[0]:.6f} != bundle's "
                        f"{self._smoke_probability:.6f}"))
                else:
                    checks["smoke_prediction"] = "ok"
        depth = None
        if not unreachable:
            try:
                depth = client.queue_depth()
            except Exception:  # noqa: BLE001 - a metric must never fail
                depth = None
        now = time.monotonic()
        return Snapshot(taken=now, checks=checks, failed=failed, workers=workers,
                        workers_error=workers_error, queue_depth=depth, duration=now - started)
