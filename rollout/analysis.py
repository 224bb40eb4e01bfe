"""Post-switch analysis: is the new release as healthy under traffic as the one it replaced?

After the switch (and its ``/version`` check) the deploy keeps probing through the floating
IP for an analysis window (the switch's load probe, ``health.Probe``: predictions and
``/version`` on fresh connections at a steady rate) and reads the live front's ``/metrics``
(prometheus text, ``modelserve_http_requests_total`` by status) at the start and the end.
The figures are compared with a baseline the same probe measured on the live release (blue)
through the floating IP just before the switch:

* error rate (HTTP 5xx / non-200, timeouts, connection failures) above ``max_error_rate``
  (probe or server side) — judged with or without a baseline;
* p99 latency above ``max_p99_ratio`` x baseline p99 + ``p99_slack_ms``, with at least
  ``min_slow`` requests slower than that limit (one outlier is not a breach) — only with a
  baseline.

The pure part (``Figures``, ``judge``, ``parse_metrics``) has no I/O; ``measure`` and
``watch`` run the probe. The executor decides what a breach does (switch back, exit 8).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import requests

from rollout import health

DEFAULT_WINDOW_S = 30.0
WINDOW_ENV = "MODELSERVE_ANALYSIS_WINDOW"
#: the early verdict needs this many requests (before that, only the window's end judges)
MIN_EARLY = 20
#: how often the running figures are judged during the window
CHECK_EVERY_S = 0.5
#: a probe request slower than this is a failure (a timeout)
PROBE_TIMEOUT_S = 5.0
#: probe pace: 2 clients, a pause between requests (a steady rate, not a load test)
PROBE_THREADS, PROBE_PAUSE_S = 2, 0.05


@dataclass(frozen=True)
class Thresholds:
    """When the analysis fails (``--max-error-rate``, ``--max-p99-ratio``, ``--p99-slack-ms``)."""

    max_error_rate: float = 0.01
    max_p99_ratio: float = 3.0
    p99_slack_ms: float = 50.0
    min_slow: int = 2

    def p99_limit_ms(self, baseline_p99_ms: float) -> float:
        """The p99 a release may reach given the baseline's."""
        return self.max_p99_ratio * baseline_p99_ms + self.p99_slack_ms


def baseline_seconds(window: float) -> float:
    """How long the baseline is measured: min(5 s, window / 3)."""
    return min(5.0, window / 3.0)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in (0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class Figures:
    """What one probe period measured (latencies in ms, of answered requests)."""

    requests: int
    failed: int
    latencies_ms: tuple[float, ...] = ()
    errors: dict = field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def from_probe(cls, res: health.ProbeResult) -> Figures:
        return cls(res.total, res.failed, tuple(x * 1000.0 for x in res.latencies),
                   dict(res.errors.most_common(5)), round(res.seconds, 3))

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    @property
    def p50_ms(self) -> float | None:
        return percentile(self.latencies_ms, 50)

    @property
    def p99_ms(self) -> float | None:
        return percentile(self.latencies_ms, 99)

    def to_dict(self) -> dict:
        """JSON-ready form (no raw latencies)."""
        def ms(x: float | None) -> float | None:
            return None if x is None else round(x, 1)
        return {"requests": self.requests, "failed": self.failed,
                "error_rate": round(self.error_rate, 4), "p50_ms": ms(self.p50_ms),
                "p99_ms": ms(self.p99_ms), "errors": self.errors, "seconds": self.seconds}


@dataclass(frozen=True)
class ServerCounts:
    """Request counts read from a front's ``/metrics`` (``/metrics`` itself excluded)."""

    requests: float
    errors: float  # status >= 500


_SAMPLE = re.compile(r'^modelserve_http_requests_total\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> ServerCounts | None:
    """The request and 5xx counts of prometheus text from app/metrics.py (the counter
    ``modelserve_http_requests`` exposes ``modelserve_http_requests_total{method,route,
    status}``); None when the text has no such counter."""
    total = errors = 0.0
    seen = False
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group("labels")))
        try:
            value = float(m.group("value"))
        except ValueError:
            continue
        seen = True
        if "metrics" in labels.get("route", ""):
            continue
        total += value
        if labels.get("status", "").isdigit() and int(labels["status"]) >= 500:
            errors += value
    return ServerCounts(total, errors) if seen else None


def server_delta(before: ServerCounts | None, after: ServerCounts | None) -> dict | None:
    """Requests and 5xx between two reads of the same front (None if either is missing or
    the counters went backwards: another process, a restart)."""
    if before is None or after is None:
        return None
    req, err = after.requests - before.requests, after.errors - before.errors
    if req < 0 or err < 0:
        return None
    return {"requests": int(req), "errors": int(err),
            "error_rate": round(err / req, 4) if req else 0.0}


@dataclass(frozen=True)
class Verdict:
    """The outcome: passed, why not, and every figure (JSON-ready in ``to_dict``)."""

    passed: bool
    reasons: tuple[str, ...]
    now: Figures
    baseline: Figures | None
    thresholds: Thresholds
    server: dict | None = None
    server_baseline: dict | None = None
    window_s: float = 0.0
    early: bool = False  # decided before the window's end

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "within thresholds"

    def to_dict(self) -> dict:
        return {"outcome": "passed" if self.passed else "failed", "reason": self.reason,
                "window_s": self.window_s, "early": self.early,
                "now": self.now.to_dict(),
                "baseline": self.baseline.to_dict() if self.baseline else None,
                "server": self.server, "server_baseline": self.server_baseline,
                "thresholds": asdict(self.thresholds)}

    def detail(self) -> str:
        """Compact figures for a history event (no ';': the event separator)."""
        def ms(x: float | None) -> str:
            return "-" if x is None else f"{x:.0f}"
        b = self.baseline
        parts = [f"err={self.now.error_rate:.2%}" + (f"/{b.error_rate:.2%}" if b else ""),
                 f"p50={ms(self.now.p50_ms)}" + (f"/{ms(b.p50_ms)}" if b else "") + "ms",
                 f"p99={ms(self.now.p99_ms)}" + (f"/{ms(b.p99_ms)}" if b else "") + "ms",
                 f"n={self.now.requests}" + (f"/{b.requests}" if b else "")]
        if self.server:
            parts.append(f"5xx={self.server['errors']}/{self.server['requests']}")
        return " ".join(parts).replace(";", ",")


def judge(now: Figures, baseline: Figures | None, th: Thresholds) -> tuple[str, ...]:
    """Why ``now`` breaches the thresholds (empty: it does not). Pure."""
    reasons = []
    if now.requests == 0:
        return ("no probe request completed through the floating IP",)
    if now.error_rate > th.max_error_rate:
        reasons.append(f"error rate {now.error_rate:.2%} ({now.failed} of {now.requests}) > "
                       f"{th.max_error_rate:.2%}")
    base_p99 = baseline.p99_ms if baseline else None
    if base_p99 is not None and now.latencies_ms:
        limit = th.p99_limit_ms(base_p99)
        slow = sum(1 for x in now.latencies_ms if x > limit)
        p99 = now.p99_ms or 0.0
        if p99 > limit and slow >= th.min_slow:
            reasons.append(f"p99 {p99:.0f} ms > {limit:.0f} ms ({th.max_p99_ratio:g} x "
                           f"baseline {base_p99:.0f} ms + {th.p99_slack_ms:g} ms; {slow} "
                           "requests slower)")
    return tuple(reasons)


def judge_server(server: dict | None, th: Thresholds) -> tuple[str, ...]:
    """A breach read from the front's own counters (real traffic included). Pure."""
    if not server or not server["requests"]:
        return ()
    if server["error_rate"] > th.max_error_rate:
        return (f"server 5xx rate {server['error_rate']:.2%} ({server['errors']} of "
                f"{server['requests']}) > {th.max_error_rate:.2%}",)
    return ()


# -- the probing part --------------------------------------------------------------------------
def read_metrics(address: str, port: int) -> ServerCounts | None:
    """The front's counters through the floating IP (None if /metrics does not answer)."""
    try:
        r = requests.get(f"{health.base_url(address, port)}/metrics", timeout=(2.0, 3.0),
                         headers={"Connection": "close"})
    except requests.RequestException:
        return None
    return parse_metrics(r.text) if r.status_code == 200 else None


def _probe(address: str, port: int, seconds: float) -> health.Probe:
    return health.Probe(address, port=port, threads=PROBE_THREADS, pause=PROBE_PAUSE_S,
                        max_seconds=seconds + 1.0, timeout=PROBE_TIMEOUT_S)


@dataclass
class Baseline:
    """What the probe measured on the live release just before the switch."""

    figures: Figures
    server: dict | None


def measure(address: str, port: int, seconds: float,
            sleep: Callable[[float], None] = time.sleep) -> Baseline:
    """Probe ``address`` for ``seconds`` (the live release, before the switch)."""
    before = read_metrics(address, port)
    probe = _probe(address, port, seconds).start()
    try:
        sleep(seconds)
    finally:
        res = probe.stop()
    return Baseline(Figures.from_probe(res), server_delta(before, read_metrics(address, port)))


def watch(address: str, port: int, window: float, baseline: Baseline | None, th: Thresholds,
          *, keepalive: Callable[[], None] | None = None,
          sleep: Callable[[float], None] = time.sleep) -> Verdict:
    """Probe ``address`` for ``window`` seconds (stopping early on a clear breach once
    ``MIN_EARLY`` requests were seen) and judge. ``keepalive`` is called about every 30 s
    (renews the lock's lease)."""
    before = read_metrics(address, port)
    probe = _probe(address, port, window).start()
    t0 = last = time.monotonic()
    early = False
    try:
        while (elapsed := time.monotonic() - t0) < window:
            sleep(min(CHECK_EVERY_S, window - elapsed))
            if keepalive and time.monotonic() - last > 30:
                keepalive()
                last = time.monotonic()
            snap = Figures.from_probe(probe.snapshot())
            if snap.requests >= MIN_EARLY and judge(snap, baseline and baseline.figures, th):
                early = True
                break
    finally:
        res = probe.stop()
    now = Figures.from_probe(res)
    server = server_delta(before, read_metrics(address, port))
    reasons = judge(now, baseline.figures if baseline else None, th) + judge_server(server, th)
    return Verdict(not reasons, reasons, now, baseline.figures if baseline else None, th,
                   server, baseline.server if baseline else None, round(window, 3), early)
