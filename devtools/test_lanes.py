"""Run the test tiers in lanes side by side, then one table for the whole run.

``python -m devtools.test_lanes [--alone TIER ...] TIER ...`` starts one pytest per lane: each
``--alone`` tier that is among the TIERs in a lane of its own, every other TIER in one lane, in
the order given. The OpenStack tier spends most of its time waiting on its control plane and on
booting servers, so on 2 cores it runs beside the others instead of after them (the README's
"Tests" section has the figures).

Each lane writes its output to ``build/test-output/lanes/<lane>.log`` and, a line at a time with
the lane's name in front, here. At the end: the tier table of every lane (tests/tier_times.py
wrote each lane's figures as JSON) with its budget, the set-up before pytest, the run's wall
time, the ten slowest cases of the whole run, one ``OVER BUDGET`` line per tier past its budget,
and a closing ``tests: N passed, N failed, N skipped`` line. The exit status is 0 only when
every lane passed.

SIGINT or SIGTERM reaches every lane's pytest as SIGINT (its fixtures tear down), then, after a
grace period, SIGKILL for whatever is left of the lane. The handlers are installed here, so a
run started with SIGINT ignored (a background job) still stops on Ctrl-C or SIGTERM, and the
lanes, exec'd after, start with the default disposition.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.tier_times import SLOWEST, over_budget, row

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "test-output" / "lanes"
GRACE_S = 120


@dataclass
class Lane:
    """One pytest process and what it ran."""

    name: str
    tiers: list[str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    ended: float = 0.0
    figures: dict = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return OUT / f"{self.name}.log"

    @property
    def times(self) -> Path:
        return OUT / f"{self.name}.json"


def tier_name(path: str) -> str:
    """``tests/openstack`` (or ``tests/openstack/test_x.py``) -> ``openstack``."""
    parts = Path(path).parts
    return parts[1] if len(parts) > 1 and parts[0] == "tests" else Path(path).stem


def plan_lanes(tiers: list[str], alone: list[str]) -> list[Lane]:
    """The lanes: each ``alone`` tier present in ``tiers`` by itself, the rest together."""
    solo = {tier_name(a) for a in alone}
    lanes = [Lane(tier_name(t), [t]) for t in tiers if tier_name(t) in solo]
    rest = [t for t in tiers if tier_name(t) not in solo]
    if rest:
        lanes.insert(0, Lane("main", rest))
    return lanes


def _pump(lane: Lane, lock: threading.Lock) -> None:
    """Copy the lane's output to its log and, prefixed with its name, to stdout."""
    assert lane.proc is not None and lane.proc.stdout is not None
    with open(lane.log, "w", encoding="utf-8", errors="replace") as log:
        for line in lane.proc.stdout:
            log.write(line)
            log.flush()
            with lock:
                sys.stdout.write(f"[{lane.name}] {line}")
                sys.stdout.flush()


def start(lane: Lane, pytest_args: list[str], lock: threading.Lock) -> threading.Thread:
    lane.times.unlink(missing_ok=True)
    env = dict(os.environ, MODELSERVE_TIER_TIMES=str(lane.times), PYTHONUNBUFFERED="1")
    lane.started = time.time()
    lane.proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *pytest_args, *lane.tiers], cwd=ROOT, env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        errors="replace", start_new_session=True)
    pump = threading.Thread(target=_pump, args=(lane, lock), daemon=True)
    pump.start()
    return pump


def stop_all(lanes: list[Lane]) -> None:
    """SIGINT to each lane's pytest (its fixtures tear down), SIGKILL to its group after the
    grace period."""
    running = [ln for ln in lanes if ln.proc is not None and ln.proc.poll() is None]
    for lane in running:
        lane.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + GRACE_S
    for lane in running:
        try:
            lane.proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(lane.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def report(lanes: list[Lane], run_started: float, ci_started: float | None) -> tuple[list[str],
                                                                                   dict]:
    """The run's table (lines) and outcome counts."""
    lines = ["", "=" * 30 + " time by tier, lanes side by side " + "=" * 30]
    loud: list[str | None] = []
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    slowest: list[tuple[str, float]] = []
    if ci_started is not None:
        lines.append(row("set-up", run_started - ci_started))
        loud.append(over_budget("set-up", run_started - ci_started))
    for lane in lanes:
        code = lane.proc.returncode if lane.proc else None
        lines.append(f"  lane {lane.name} ({', '.join(tier_name(t) for t in lane.tiers)}): "
                     f"{(lane.ended - lane.started) / 60:.1f} min, exit {code}")
        if not lane.figures:
            lines.append(f"    no figures: pytest wrote no {lane.times.name} (see {lane.log})")
            counts["failed"] += 1
            continue
        for name, t in sorted(lane.figures["tiers"].items(), key=lambda kv: kv[1]["first"]):
            lines.append("  " + row(name, t["seconds"], t["tests"], t["failed"]))
            loud.append(over_budget(name, t["seconds"]))
        for key in counts:
            counts[key] += lane.figures["counts"][key]
        slowest += [(f"[{lane.name}] {n}", s) for n, s in lane.figures["slowest"]]
    total = time.time() - (ci_started if ci_started is not None else run_started)
    lines.append(row("all", total))
    loud.append(over_budget("all", total))
    lines.append(f"  the {SLOWEST} slowest cases of the run (set-up + call + teardown):")
    for nodeid, secs in sorted(slowest, key=lambda x: -x[1])[:SLOWEST]:
        lines.append(f"  {secs:7.0f} s  {nodeid}")
    lines += [line for line in loud if line]
    return lines, counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m devtools.test_lanes", description=__doc__.split(
        "\n\n")[0])
    ap.add_argument("--alone", action="append", default=[], metavar="TIER",
                    help="run this tier in a lane of its own (repeatable)")
    ap.add_argument("--pytest-arg", action="append", default=[], metavar="ARG",
                    help="an argument for every lane's pytest (repeatable)")
    ap.add_argument("tiers", nargs="+", metavar="TIER")
    args = ap.parse_args(argv)
    lanes = plan_lanes(args.tiers, args.alone)
    OUT.mkdir(parents=True, exist_ok=True)
    started = float(os.environ["MODELSERVE_CI_STARTED"]) if os.environ.get(
        "MODELSERVE_CI_STARTED") else None
    run_started = time.time()
    stopping = threading.Event()

    def on_signal(signum, _frame):
        if not stopping.is_set():
            stopping.set()
            print(f"\ntest_lanes: {signal.Signals(signum).name}: stopping every lane",
                  flush=True)
            threading.Thread(target=stop_all, args=(lanes,), daemon=True).start()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    lock = threading.Lock()
    print("test_lanes: " + "; ".join(f"lane {ln.name}: {' '.join(ln.tiers)}" for ln in lanes),
          flush=True)
    pumps = [start(lane, args.pytest_arg, lock) for lane in lanes]
    # poll, not wait(): each lane's end is noted as it comes, and signals are handled at once
    while not all(lane.ended for lane in lanes):
        for lane in lanes:
            if not lane.ended and lane.proc.poll() is not None:
                lane.ended = time.time()
        time.sleep(0.5)
    for lane, pump in zip(lanes, pumps, strict=True):
        pump.join(30)
        if lane.times.exists():
            lane.figures = json.loads(lane.times.read_text())
    lines, counts = report(lanes, run_started, started)
    print("\n".join(lines), flush=True)
    codes = [lane.proc.returncode for lane in lanes]
    failed = counts["failed"] or any(codes)
    if any(codes) and not counts["failed"]:
        counts["failed"] = 1  # a lane failed without a failed case (collection, the LXD guard)
    print(f"tests: {counts['passed']} passed, {counts['failed']} failed, "
          f"{counts['skipped']} skipped", flush=True)
    if stopping.is_set():
        return 130
    return next((c for c in codes if c), 1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
