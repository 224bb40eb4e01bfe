"""Rollback benchmark: command start -> the floating IP serves the previous release (goal <= 1 s).

Measured as a user runs it: ``python -m rollout rollback --env E`` in a new process each time,
back and forth between two warm releases. The clock starts just before the process is
spawned; a thread polls ``/version`` through the floating IP (every 10 ms) and stops the
clock when it names the target release (``to_traffic``); ``to_exit`` is when the command
has exited (history recorded, lock released). Every rollback must exit 0.

Baselines in the same run (same machine, same load): ``python -c pass`` (the interpreter),
``python -c "import rollout.cli"`` (the CLI's imports) and ``python -m rollout --version``.
Breakdown of one rollback: interpreter + imports (``-X importtime`` of a real rollback, the
cloud SDK included), the steps the executor times (health gate, switch = the CAS update plus
the load probe's waits, verify), and the rest (opening the cloud, the two observations,
taking and releasing the lock, history, the summary) = to_exit minus those.

LXD (default): the bench works in its own LXD project (``--project``, default
``modelserve-bench``; never ``default``), builds the stand-in releases there
(tests/e2e/standin.py), deploys A then B in a fresh env, times ``--rounds`` rollbacks and
destroys the env at the end. OpenStack (``--cloud openstack``): OS_CLOUD and
OS_CLIENT_CONFIG_FILE from the environment, else the local harness's (already up: its LXD
host's project); the bench uploads two stand-in release images that boot there
(tests/openstack/standins.py; deleted at the end) and also times rollbacks with
``MODELSERVE_OS_TOKEN_CACHE=0`` (a Keystone login every time).
``--compare TREE`` interleaves rollbacks run from another checkout (``git archive HEAD | tar
-x -C TREE``): before/after in the same run, same env.
Prints a table, writes bench/results/rollback_bench-<cloud>-<time>.json.

Usage: python bench/rollback_bench.py [--cloud lxd|openstack] [--project P] [--a R] [--b R]
       [--rounds N] [--label TEXT] [--no-probe] [--compare TREE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PY = sys.executable
GOAL_S = 1.0


def run(*argv: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(argv), cwd=ROOT, capture_output=True, text=True, env=env,
                         check=False, timeout=900)
    if check and res.returncode:
        raise SystemExit(f"{' '.join(argv[:6])} failed ({res.returncode}): "
                         f"{res.stderr.strip().splitlines()[-3:]}")
    return res


def rollout(*args: str) -> dict:
    return json.loads(run(PY, "-m", "rollout", *args, "--json").stdout)


def wall(*argv: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        run(*argv)
        out.append(time.perf_counter() - t0)
    return out


def version_of(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as resp:
            return json.loads(resp.read()).get("release")
    except (OSError, ValueError):
        return None


def timed_rollback(env: str, target: str, fip: str, extra: tuple[str, ...] = (),
                   tree: Path = ROOT, env_extra: dict | None = None) -> dict:
    """One rollback in a new process (the rollout of ``tree``): seconds to traffic on
    ``target`` and to exit."""
    url = f"http://{fip}:8080/version"
    seen: dict[str, float] = {}
    stop = threading.Event()
    t0 = time.perf_counter()

    def poll() -> None:
        while not stop.is_set():
            if version_of(url) == target:
                seen["t"] = time.perf_counter() - t0
                return
            time.sleep(0.01)

    proc = subprocess.Popen([PY, "-m", "rollout", "rollback", "--env", env, "--json", *extra],
                            cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env_extra or {})})
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    out, err = proc.communicate(timeout=300)
    to_exit = time.perf_counter() - t0
    poller.join(timeout=10)
    stop.set()
    if proc.returncode:
        raise SystemExit(f"rollback failed ({proc.returncode}): {err.strip().splitlines()[-3:]}")
    res = json.loads(out)
    if res["release"] != target:
        raise SystemExit(f"rollback went to {res['release']}, expected {target}")
    return {"to_traffic": seen.get("t", float("nan")), "to_exit": to_exit,
            "in_executor": res["seconds"], "timings": res["timings"]}


def import_total(env: str, cloud_flag: tuple[str, ...]) -> float:
    """Seconds of imports in a real rollback (``-X importtime``: the SDK's lazy import too)."""
    res = run(PY, "-X", "importtime", "-m", "rollout", "rollback", "--env", env, *cloud_flag)
    total = 0
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
        if m and not m.group(2).startswith(" "):  # top-level imports only
            total += int(m.group(1))
    return total / 1e6


def lxd_setup(args) -> tuple[object, callable]:
    from localcloud.lxd.project import ensure_project, lxc_conf_dir

    if args.project == "default":
        raise SystemExit("the bench never runs in the default LXD project: --project NAME")
    ensure_project(args.project)
    os.environ["MODELSERVE_LXD_PROJECT"] = args.project
    os.environ["LXD_CONF"] = str(lxc_conf_dir(args.project))
    from rollout.clouds.lxd import LXDCloud
    from tests.e2e.standin import build_standin

    build_standin(args.a, accuracy=0.78)
    build_standin(args.b, accuracy=0.80)
    cloud = LXDCloud(project=args.project)

    def destroy(env: str) -> None:
        from rollout.clouds.base import preview_env

        for inst in cloud.list_instances(env):
            cloud.delete_instance(inst.id)
        for key in (env, preview_env(env)):
            while (fip := cloud.find_floating_ip(key)) is not None:
                cloud.delete_floating_ip(fip)
            cloud._drop_mutex(key, force=True)  # noqa: SLF001 - the bench's own env
    return cloud, destroy


def os_setup(args) -> tuple[object, callable]:
    """OS_CLOUD + OS_CLIENT_CONFIG_FILE from the environment, or the local harness's
    (localcloud/openstack, already up: the project of its LXD host). Release images A and B
    are stand-ins uploaded by the bench (tests/openstack/standins.py: they boot as servers
    there) unless ``--a``/``--b`` name existing ones; the bench's own images are deleted
    after."""
    import openstack

    if not os.environ.get("OS_CLOUD"):
        from localcloud.openstack import seed
        from localcloud.openstack.harness import Harness

        os.environ.update(seed.rollout_env(Harness()))
    conn = openstack.connect(cloud=os.environ["OS_CLOUD"])
    made = []
    if args.a == "standin-a" and args.b == "standin-b":  # the defaults: make our own
        from tests.openstack import standins

        meta = json.loads((ROOT / "app/bundle/metadata.json").read_text())
        tag = secrets.token_hex(3)
        args.a, args.b = f"rb{tag}-a", f"rb{tag}-b"
        for n, (rel, spec) in enumerate(((args.a, "a"), (args.b, "b"))):
            img = standins.upload(conn, rel, spec, {
                "modelserve_model_accuracy": str(meta["metrics"]["accuracy"]),
                "modelserve_built_at": f"2026-01-0{n + 1}T00:00:00Z",
                "modelserve_git_sha": "0" * 12, "modelserve_app_version": "bench",
                "modelserve_accuracy_floor": str(meta["accuracy_floor"])})
            made.append(img.id)

    def destroy(env: str) -> None:
        run(PY, "-m", "rollout", "destroy", "--env", env, "--yes", "--cloud", "openstack",
            check=False)
        for image_id in made:
            standins.delete(conn, image_id)
    return conn, destroy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cloud", choices=("lxd", "openstack"), default="lxd")
    ap.add_argument("--project", default=os.environ.get("MODELSERVE_BENCH_LXD_PROJECT",
                                                         "modelserve-bench"))
    ap.add_argument("--a", default="standin-a")
    ap.add_argument("--b", default="standin-b")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--label", default="", help="recorded in the JSON (e.g. before/after)")
    ap.add_argument("--no-probe", action="store_true", help="also time rollbacks --no-probe")
    ap.add_argument("--compare", type=Path, default=None, metavar="TREE",
                    help="another checkout (e.g. `git archive HEAD | tar -x -C DIR`): its "
                         "rollbacks are interleaved with this tree's, same env, same run")
    args = ap.parse_args()
    if args.cloud == "lxd":
        _, destroy = lxd_setup(args)
        cloud_flag: tuple[str, ...] = ("--cloud", "lxd")
    else:
        _, destroy = os_setup(args)
        cloud_flag = ("--cloud", "openstack")
    env = f"rb{secrets.token_hex(3)}"
    results: dict = {"cloud": args.cloud, "label": args.label, "env": env, "a": args.a,
                     "b": args.b, "rounds": args.rounds, "goal_s": GOAL_S,
                     "project": args.project if args.cloud == "lxd" else None,
                     "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "loadavg_start": os.getloadavg()[0]}
    try:
        n = max(3, args.rounds // 2)
        results["baseline_python_pass_s"] = wall(PY, "-c", "pass", n=n)
        results["baseline_import_cli_s"] = wall(PY, "-c", "import rollout.cli", n=n)
        results["baseline_version_s"] = wall(PY, "-m", "rollout", "--version", n=n)
        common = ("--env", env, *cloud_flag)
        rollout("deploy", *common, "--release", args.a, "--analysis-window", "0", "--no-probe")
        rollout("deploy", *common, "--release", args.b, "--analysis-window", "0", "--no-probe")
        fip = rollout("status", *common)["floating_ip"]
        live, other = args.b, args.a
        runs = []
        for _ in range(args.rounds):
            runs.append(timed_rollback(env, other, fip, cloud_flag))
            live, other = other, live
        results["runs"] = runs
        if args.compare:
            results["compare_tree"] = str(args.compare)
            results["runs_compare"], results["runs_interleaved"] = [], []
            for _ in range(args.rounds):
                results["runs_compare"].append(
                    timed_rollback(env, other, fip, cloud_flag, tree=args.compare.resolve()))
                live, other = other, live
                results["runs_interleaved"].append(timed_rollback(env, other, fip, cloud_flag))
                live, other = other, live
        if args.cloud == "openstack":  # the same, logging in to Keystone every time
            results["runs_no_token_cache"] = []
            for _ in range(args.rounds):
                results["runs_no_token_cache"].append(timed_rollback(
                    env, other, fip, cloud_flag, env_extra={"MODELSERVE_OS_TOKEN_CACHE": "0"}))
                live, other = other, live
        if args.no_probe:
            results["runs_no_probe"] = []
            for _ in range(args.rounds):
                results["runs_no_probe"].append(
                    timed_rollback(env, other, fip, (*cloud_flag, "--no-probe")))
                live, other = other, live
        results["imports_in_rollback_s"] = import_total(env, cloud_flag)  # one more rollback, with -X
        results["loadavg_end"] = os.getloadavg()[0]
    finally:
        destroy(env)

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    def p90(xs: list[float]) -> float:
        xs = sorted(xs)
        return xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]

    runs = results["runs"]
    traffic = [r["to_traffic"] for r in runs]
    exits = [r["to_exit"] for r in runs]
    base = med(results["baseline_python_pass_s"])
    steps = {k: med([r["timings"].get(k, 0.0) for r in runs])
             for k in ("health_gate", "switch", "verify")}
    imports = results["imports_in_rollback_s"]
    rest = med(exits) - base - imports - sum(steps.values())
    results["summary"] = {
        "to_traffic_median_s": round(med(traffic), 3), "to_traffic_p90_s": round(p90(traffic), 3),
        "to_exit_median_s": round(med(exits), 3), "to_exit_p90_s": round(p90(exits), 3),
        "python_pass_s": round(base, 3),
        "import_cli_s": round(med(results["baseline_import_cli_s"]), 3),
        "version_s": round(med(results["baseline_version_s"]), 3),
        "imports_in_rollback_s": round(imports, 3),
        **{f"{k}_s": round(v, 3) for k, v in steps.items()},
        "cloud_lock_history_rest_s": round(rest, 3),
        "to_traffic_over_python_pass": round(med(traffic) / base, 1),
        "to_traffic_over_version": round(med(traffic) / med(results["baseline_version_s"]), 2),
        "meets_goal": p90(traffic) <= GOAL_S,
    }
    if results.get("runs_no_probe"):
        np_t = [r["to_traffic"] for r in results["runs_no_probe"]]
        results["summary"]["no_probe_to_traffic_median_s"] = round(med(np_t), 3)
    if results.get("runs_compare"):
        for key, label in (("runs_compare", "compare"), ("runs_interleaved", "interleaved")):
            rs = results[key]
            results["summary"][f"{label}_to_traffic_median_s"] = round(
                med([r["to_traffic"] for r in rs]), 3)
            results["summary"][f"{label}_to_exit_median_s"] = round(
                med([r["to_exit"] for r in rs]), 3)
        results["summary"]["interleaved_over_compare_to_traffic"] = round(
            results["summary"]["interleaved_to_traffic_median_s"]
            / results["summary"]["compare_to_traffic_median_s"], 2)
    if results.get("runs_no_token_cache"):
        results["summary"]["no_token_cache_to_traffic_median_s"] = round(
            med([r["to_traffic"] for r in results["runs_no_token_cache"]]), 3)
    s = results["summary"]
    rows = [
        ("rollback: start -> FIP serves target (median / p90)",
         f"{s['to_traffic_median_s']:.3f} / {s['to_traffic_p90_s']:.3f}", f"<= {GOAL_S:g}"),
        ("rollback: start -> command exited (median / p90)",
         f"{s['to_exit_median_s']:.3f} / {s['to_exit_p90_s']:.3f}", "-"),
        ("  interpreter (python -c pass)", f"{s['python_pass_s']:.3f}", "baseline"),
        ("  imports in a rollback (-X importtime)", f"{s['imports_in_rollback_s']:.3f}", "-"),
        ("  health gate (quick)", f"{s['health_gate_s']:.3f}", "-"),
        ("  switch (CAS update + probe waits)", f"{s['switch_s']:.3f}", "-"),
        ("  verify (/version via FIP)", f"{s['verify_s']:.3f}", "-"),
        ("  rest: open cloud, observe x2, lock, history", f"{s['cloud_lock_history_rest_s']:.3f}",
         "-"),
        ("baseline: python -c 'import rollout.cli'", f"{s['import_cli_s']:.3f}", "-"),
        ("baseline: python -m rollout --version", f"{s['version_s']:.3f}", "-"),
        ("ratio: to-traffic / python -c pass", f"{s['to_traffic_over_python_pass']}x", "-"),
        ("ratio: to-traffic / rollout --version", f"{s['to_traffic_over_version']}x", "-"),
    ]
    if "no_probe_to_traffic_median_s" in s:
        rows.insert(2, ("rollback --no-probe: start -> FIP serves target (median)",
                        f"{s['no_probe_to_traffic_median_s']:.3f}", "-"))
    if "no_token_cache_to_traffic_median_s" in s:
        rows.insert(2, ("rollback, MODELSERVE_OS_TOKEN_CACHE=0: to traffic (median)",
                        f"{s['no_token_cache_to_traffic_median_s']:.3f}", "-"))
    if "compare_to_traffic_median_s" in s:
        rows[2:2] = [
            (f"interleaved: {args.compare} (to traffic / to exit, median)",
             f"{s['compare_to_traffic_median_s']:.3f} / {s['compare_to_exit_median_s']:.3f}", "-"),
            ("interleaved: this tree (to traffic / to exit, median)",
             f"{s['interleaved_to_traffic_median_s']:.3f} / {s['interleaved_to_exit_median_s']:.3f}",
             "-"),
            ("ratio: this tree / compared tree, to traffic",
             f"{s['interleaved_over_compare_to_traffic']}x", "-")]
    width = max(len(r[0]) for r in rows)
    print(f"rollback bench on {args.cloud} ({len(runs)} rollbacks, env {env}"
          f"{', ' + args.label if args.label else ''}; seconds)")
    print(f"{'measure':<{width}}  {'value':>15}  goal")
    for name, val, goal in rows:
        print(f"{name:<{width}}  {val:>15}  {goal}")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"rollback_bench-{args.cloud}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
