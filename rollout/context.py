"""What every run needs (``Context``), the run's identity, and the test hook.

``Context.cloud`` is always a ``BoundedCloud`` (invariant I6): whatever cloud it is given is
wrapped at construction, so the executor, the lock and the views cannot make a bare call.
"""

from __future__ import annotations

import getpass
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from rollout.analysis import Thresholds
from rollout.bounded import BoundedCloud
from rollout.clouds.base import Lock
from rollout.errors import WaitTimeout
from rollout.notify import Notifier
from rollout.report import Reporter

#: the lease a run's lock carries; renewed before every step (and while paused by the hook).
#: Longer than any one step (boot 180 s + health 240 s by default).
LEASE_S = 900.0
PAUSE_ENV = "MODELSERVE_ROLLOUT_PAUSE_BEFORE"
HOOK_DIR_ENV = "MODELSERVE_ROLLOUT_HOOK_DIR"
HOOK_WAIT_S = 600.0
HOOK_POLL_S = 0.05
_ISO = "%Y-%m-%dT%H:%M:%SZ"


def utcnow(offset_s: float = 0.0) -> str:
    """ISO-8601 UTC, seconds (``offset_s`` from now)."""
    return (datetime.now(timezone.utc) + timedelta(seconds=offset_s)).strftime(_ISO)


def parse_utc(text: str) -> datetime | None:
    """Inverse of ``utcnow`` (None if it does not parse)."""
    try:
        return datetime.strptime(text, _ISO).replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return None


def new_deploy_id() -> str:
    """A short random id naming one run (and its instances)."""
    return secrets.token_hex(3)


def default_holder() -> str:
    """user@host:pid — who holds a lock."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


@dataclass
class Context:
    """What every run needs; tests swap any part (sleep, timeouts, reporter, cloud)."""

    cloud: BoundedCloud
    env: str
    reporter: Reporter = field(default_factory=Reporter)
    deploy_id: str = field(default_factory=new_deploy_id)
    holder: str = field(default_factory=default_holder)
    sleep: Callable[[float], None] = time.sleep
    boot_timeout: float = 180.0
    health_timeout: float = 240.0
    probe: bool = True
    worker_concurrency: int = 2
    flavor: str = ""
    port: int = 8080
    lease_s: float = LEASE_S
    # post-switch analysis (rollout/analysis.py): seconds (0: off; the CLI's default is 30)
    analysis_window: float = 0.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    # deploy notifications (rollout/notify.py); None: none
    notifier: Notifier | None = None
    # test hook: called with each step before it runs (fault injection at the step boundary)
    before_step: Callable[[object], None] | None = None
    # set by lock.env_lock: the lock this run holds (renewed), the one it took over
    held: Lock | None = None
    took_over: Lock | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.cloud, BoundedCloud):
            self.cloud = BoundedCloud(self.cloud, sleep=lambda s: self.sleep(s))


def pause_hook(kind: str, *, keepalive: Callable[[], None] | None = None) -> None:
    """The contract's test hook: with ``MODELSERVE_ROLLOUT_PAUSE_BEFORE`` naming ``kind``
    (comma-separated list allowed) and ``MODELSERVE_ROLLOUT_HOOK_DIR`` set, create
    ``<dir>/<kind>.reached`` (content: our pid), then wait, checking every 0.05 s, for
    ``<dir>/<kind>.go`` (at most 600 s: ``WaitTimeout``). Signals act as anywhere else.
    ``keepalive`` is called about once a minute (renews the lock's lease)."""
    kinds = [k.strip() for k in os.environ.get(PAUSE_ENV, "").split(",") if k.strip()]
    hook_dir = os.environ.get(HOOK_DIR_ENV, "")
    if kind not in kinds or not hook_dir:
        return
    d = Path(hook_dir)
    tmp = d / f".{kind}.reached.{os.getpid()}"
    tmp.write_text(str(os.getpid()))
    tmp.replace(d / f"{kind}.reached")
    go = d / f"{kind}.go"
    t0 = last = time.monotonic()
    while not go.exists():
        now = time.monotonic()
        if now - t0 > HOOK_WAIT_S:
            raise WaitTimeout(f"test hook: {go} did not appear within {HOOK_WAIT_S:g}s")
        if keepalive and now - last > 60:
            keepalive()
            last = now
        time.sleep(HOOK_POLL_S)
