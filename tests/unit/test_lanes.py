"""devtools/test_lanes.py: which tiers share a lane, and the run's closing table."""

from __future__ import annotations

import subprocess
import sys

from devtools import test_lanes
from devtools.test_lanes import Lane, plan_lanes, report
from tests import tier_times


def test_an_alone_tier_gets_a_lane_the_rest_share_one_in_order():
    lanes = plan_lanes(["tests/unit", "tests/integration", "tests/openstack", "tests/e2e"],
                       ["tests/openstack"])
    assert [(ln.name, ln.tiers) for ln in lanes] == [
        ("main", ["tests/unit", "tests/integration", "tests/e2e"]),
        ("openstack", ["tests/openstack"])]


def test_an_alone_tier_that_is_not_asked_for_adds_no_lane():
    lanes = plan_lanes(["tests/unit"], ["tests/openstack"])
    assert [(ln.name, ln.tiers) for ln in lanes] == [("main", ["tests/unit"])]


def _lane(name, tiers, figures, code=0):
    lane = Lane(name, tiers, started=1000.0, ended=1600.0, figures=figures)
    lane.proc = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
    lane.proc.wait()
    return lane


def _figures(tier, seconds, counts, slowest):
    return {"tiers": {tier: {"seconds": seconds, "tests": sum(counts.values()), "failed":
                             counts["failed"], "first": 0}},
            "counts": counts, "slowest": slowest, "pytest": seconds, "setup": None}


def test_the_report_adds_up_lanes_names_the_slowest_and_is_loud_over_budget(monkeypatch):
    monkeypatch.setitem(tier_times.BUDGETS, "openstack", 1)
    main = _lane("main", ["tests/unit"], _figures(
        "unit", 30.0, {"passed": 10, "failed": 0, "skipped": 1}, [["tests/unit/a.py::t", 3.0]]))
    os_lane = _lane("openstack", ["tests/openstack"], _figures(
        "openstack", 90.0, {"passed": 4, "failed": 1, "skipped": 0},
        [["tests/openstack/b.py::t", 50.0]]), code=1)
    lines, counts = report([main, os_lane], run_started=1000.0, ci_started=940.0)
    text = "\n".join(lines)
    assert counts == {"passed": 14, "failed": 1, "skipped": 1}
    assert "set-up" in text and "lane openstack (openstack): 10.0 min, exit 1" in text
    slow = [ln for ln in lines if ln.strip().endswith("::t")]
    assert slow[0].endswith("[openstack] tests/openstack/b.py::t")  # slowest first
    assert "OVER BUDGET: openstack took 1.5 min, its budget is 1 min" in text
    assert "OVER BUDGET: unit" not in text


def test_a_lane_without_figures_counts_as_a_failure():
    lane = _lane("main", ["tests/unit"], {}, code=2)
    lines, counts = report([lane], run_started=1000.0, ci_started=None)
    assert counts["failed"] == 1 and any("no figures" in ln for ln in lines)


def test_the_readme_states_every_budget():
    from pathlib import Path

    readme = (Path(test_lanes.ROOT) / "README.md").read_text()
    for name, minutes in tier_times.BUDGETS.items():
        assert f"| {name} | {minutes} min |" in readme, f"README: budget of {name}"


def _run_lanes(tmp_path, *extra, preexec=None, **popen):
    """The real runner on two tiny tiers of its own (tmp files), as `make test` starts it."""
    root = test_lanes.ROOT
    cmd = [sys.executable, "-m", "devtools.test_lanes",
           "--pytest-arg=-c", f"--pytest-arg={root / 'pyproject.toml'}", "--pytest-arg=-q",
           *extra]
    return subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=preexec, **popen)


def test_lanes_run_side_by_side_and_a_failure_in_one_fails_the_run(tmp_path):
    """Each tier waits until the other has started: run one after the other, both would
    time out; side by side both pass. The closing line counts both lanes' cases."""
    for me, other in (("a", "b"), ("b", "a")):
        (tmp_path / f"test_{me}.py").write_text(
            "import pathlib, time\n"
            f"def test_{me}_sees_{other}_running():\n"
            f"    pathlib.Path({str(tmp_path)!r}, '{me}.started').touch()\n"
            "    deadline = time.monotonic() + 60\n"
            f"    while not pathlib.Path({str(tmp_path)!r}, '{other}.started').exists():\n"
            "        assert time.monotonic() < deadline, 'the other lane never started'\n"
            "        time.sleep(0.05)\n"
            f"def test_{me}_fails():\n"
            f"    assert {me == 'b'}\n")
    proc = _run_lanes(tmp_path, "--alone", str(tmp_path / "test_b.py"),
                      str(tmp_path / "test_a.py"), str(tmp_path / "test_b.py"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "tests: 3 passed, 1 failed, 0 skipped" in out.splitlines(), out
    assert "[main] " in out and "[test_b] " in out


def test_sigint_stops_every_lane_even_when_started_with_sigint_ignored(tmp_path):
    """CI may start the suite as a background job (SIGINT ignored): Ctrl-C or SIGTERM must
    still stop every lane, tearing its fixtures down (a finalizer writes a file)."""
    import signal
    import time

    for name in ("a", "b"):
        (tmp_path / f"test_{name}.py").write_text(
            "import pathlib, time, pytest\n"
            "@pytest.fixture\n"
            "def marker():\n"
            "    yield\n"
            f"    pathlib.Path({str(tmp_path)!r}, '{name}.torn-down').touch()\n"
            "def test_waits(marker):\n"
            f"    pathlib.Path({str(tmp_path)!r}, '{name}.running').touch()\n"
            "    time.sleep(300)\n")
    proc = _run_lanes(tmp_path, "--alone", str(tmp_path / "test_b.py"),
                      str(tmp_path / "test_a.py"), str(tmp_path / "test_b.py"),
                      preexec=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"{n}.running").exists() for n in "ab"):
        assert time.monotonic() < deadline and proc.poll() is None, "the lanes never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 130, out
    assert all((tmp_path / f"{n}.torn-down").exists() for n in "ab"), out
