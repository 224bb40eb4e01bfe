"""A pytest plugin (``-p tests.tier_times``): the wall time of each tier, printed at the end.

A tier is the first folder under ``tests/`` (``tests/unit/rollout`` counts as ``unit``). Its time
runs from its first test's set-up to its last test's teardown, fixtures included, so the rows
add up to the session's time less collection. With ``MODELSERVE_CI_STARTED`` (epoch seconds,
set by .ci/run) the set-up before pytest started is shown too.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

_tiers: dict[str, dict] = {}
_session_start = time.time()


def _tier(nodeid: str) -> str:
    parts = nodeid.split("::")[0].split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "tests" else parts[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    t0 = time.time()
    yield
    t = _tiers.setdefault(_tier(item.nodeid), {"first": t0, "last": t0, "tests": 0,
                                                "failed": 0})
    t["last"] = time.time()
    t["tests"] += 1


def pytest_runtest_logreport(report):
    if report.failed:
        t = _tiers.get(_tier(report.nodeid))
        if t is not None:
            t["failed"] += 1


def pytest_terminal_summary(terminalreporter):
    if not _tiers:
        return
    tr = terminalreporter
    tr.section("time by tier")
    rows = []
    started = os.environ.get("MODELSERVE_CI_STARTED")
    if started:
        rows.append(("set-up before pytest", _session_start - float(started), "", ""))
    for name, t in sorted(_tiers.items(), key=lambda kv: kv[1]["first"]):
        rows.append((name, t["last"] - t["first"], t["tests"], t["failed"]))
    rows.append(("pytest in all", time.time() - _session_start, "", ""))
    for name, secs, n, failed in rows:
        extra = f"{n:>5} tests" if n != "" else ""
        extra += f", {failed} failed" if failed else ""
        tr.write_line(f"  {name:<22} {secs/60:6.1f} min  {secs:7.0f} s  {extra}")
    out = os.environ.get("MODELSERVE_TIER_TIMES")
    if out:
        Path(out).write_text(json.dumps({n: round(s, 1) for n, s, *_ in rows}, indent=1))
