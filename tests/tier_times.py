"""A pytest plugin (``-p tests.tier_times``): the wall time of each tier, printed at the end.

A tier is the first folder under ``tests/`` (``tests/unit/rollout`` counts as ``unit``). Its time
runs from its first test's set-up to its last test's teardown, fixtures included, so the rows
add up to the session's time less collection. With ``MODELSERVE_CI_STARTED`` (epoch seconds,
set by .ci/run) the set-up before pytest started is shown too.

Each row carries the tier's budget (``BUDGETS``, the README's table) and a loud ``OVER BUDGET``
line when it ran past it; the ten slowest cases (set-up + call + teardown) follow. With
``MODELSERVE_TIER_TIMES=FILE`` the same figures are written as JSON, which is how
``devtools/test_lanes.py`` merges the tables of tiers run side by side.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

# Minutes a fresh run of each tier may take on one of these 2-core machines (README "Tests").
# The whole run's budget is "all"; lanes run side by side, so "all" is less than the sum.
BUDGETS = {"set-up": 8, "unit": 3, "integration": 10, "image": 6, "e2e": 13, "openstack": 26,
           "all": 35}
SLOWEST = 10

_tiers: dict[str, dict] = {}
_cases: dict[str, dict] = {}
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
    case = _cases.setdefault(report.nodeid, {"seconds": 0.0, "outcome": "passed"})
    case["seconds"] += report.duration
    if report.failed:
        # a failed set-up or teardown is an error of the case, a failed call its failure
        case["outcome"] = "failed"
        t = _tiers.get(_tier(report.nodeid))
        if t is not None:
            t["failed"] += 1
    elif report.skipped and case["outcome"] == "passed":
        case["outcome"] = "skipped"


def over_budget(name: str, seconds: float) -> str | None:
    """The loud line for a tier (or set-up, or "all") that ran past its budget, else None."""
    budget = BUDGETS.get(name)
    if budget is None or seconds <= budget * 60:
        return None
    return f"OVER BUDGET: {name} took {seconds / 60:.1f} min, its budget is {budget} min"


def row(name: str, seconds: float, tests: int | str = "", failed: int = 0) -> str:
    """One line of the tier table."""
    budget = BUDGETS.get(name)
    extra = f"{tests:>5} tests" if tests != "" else ""
    extra += f", {failed} failed" if failed else ""
    limit = f"/ {budget:>3} min" if budget is not None else " " * 9
    return f"  {name:<22} {seconds / 60:6.1f} min {limit}  {seconds:7.0f} s  {extra}"


def summary() -> dict:
    """This session's figures: tiers, set-up, slowest cases, outcome counts."""
    started = os.environ.get("MODELSERVE_CI_STARTED")
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in _cases.values():
        counts[case["outcome"]] += 1
    return {
        "setup": _session_start - float(started) if started else None,
        "tiers": {n: {"seconds": round(t["last"] - t["first"], 1), "tests": t["tests"],
                      "failed": t["failed"], "first": t["first"]}
                  for n, t in _tiers.items()},
        "pytest": round(time.time() - _session_start, 1),
        "slowest": sorted(([n, round(c["seconds"], 1)] for n, c in _cases.items()),
                          key=lambda x: -x[1])[:SLOWEST],
        "counts": counts,
    }


def pytest_terminal_summary(terminalreporter):
    if not _tiers:
        return
    tr = terminalreporter
    data = summary()
    tr.section("time by tier")
    lines, loud = [], []
    if data["setup"] is not None:
        lines.append(row("set-up", data["setup"]))
        loud.append(over_budget("set-up", data["setup"]))
    for name, t in sorted(data["tiers"].items(), key=lambda kv: kv[1]["first"]):
        lines.append(row(name, t["seconds"], t["tests"], t["failed"]))
        loud.append(over_budget(name, t["seconds"]))
    lines.append(row("pytest in all", data["pytest"]))
    for line in lines:
        tr.write_line(line)
    tr.write_line(f"  the {SLOWEST} slowest cases (set-up + call + teardown):")
    for nodeid, secs in data["slowest"]:
        tr.write_line(f"  {secs:7.0f} s  {nodeid}")
    for line in filter(None, loud):
        tr.write_line(line, red=True, bold=True)
    out = os.environ.get("MODELSERVE_TIER_TIMES")
    if out:
        Path(out).write_text(json.dumps(data, indent=1))
