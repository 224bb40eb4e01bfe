"""Deploy benchmark on the local LXD cloud: how long until traffic is on the new release.

Measures, in one run and on the same machine:
  * baseline: a bare ``lxc launch`` of the release image until its /readyz answers 200
    (what launching by hand costs, no gate, no switch), and a bare forward re-target;
  * ``rollout deploy`` of a new release: start -> the floating IP serves it (goal <= 20 s),
    with the median of each step (launch, boot wait, health gate, switch, ...);
  * ``rollout rollback`` and a forward deploy to the warm release (goal <= 2 s);
  * the built-in probe's failed requests during every switch (goal 0).
Prints a table, writes bench/results/deploy_bench-<time>.json.

Usage: python bench/deploy_bench.py [--a RELEASE] [--b RELEASE] [--rounds N]
       Instances go on the local cloud's copy-on-write pool when up.sh made one (see
       rollout/clouds/lxd.py ``pool``); the bare-launch baseline is measured on the dir pool
       and, with the images warmed as `make image` leaves them, on the copy-on-write pool.
Images must exist (``make image RELEASE=...``); the env it uses is destroyed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import requests
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from localcloud.lxd.project import lxc_env  # noqa: E402
from rollout.clouds.lxd import LXDCloud  # noqa: E402
from rollout.seed import Credentials, SeedParams, render_user_data  # noqa: E402


def rollout(*args: str) -> dict:
    if args[0] == "deploy":  # start -> serving; the post-switch analysis watches afterwards
        args = (*args, "--analysis-window", "0")
    res = subprocess.run([sys.executable, "-m", "rollout", *args, "--json"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    if res.returncode:
        raise SystemExit(f"rollout {' '.join(args)} failed ({res.returncode}): "
                         f"{res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout)


def baseline_launch(cloud: LXDCloud, release: str, pool: str | None) -> float:
    """Bare launch of the image with a seed until /readyz is 200 (no gate, no switch), on
    ``pool`` (None: the profile's)."""
    name = f"bench-bare-{secrets.token_hex(3)}"
    rel = cloud.find_release(release)
    if rel is None:
        raise SystemExit(f"no image for {release}: make image RELEASE={release}")
    seed = render_user_data(SeedParams("front", "blue", release, "bench0", "bench",
                                       Credentials.generate()))
    pool = ["-s", pool] if pool else []
    t0 = time.monotonic()
    subprocess.run(["lxc", "launch", rel.name, name, *pool, "-c",
                    f"cloud-init.user-data={seed}"], check=True, capture_output=True)
    try:
        while time.monotonic() - t0 < 300:
            out = subprocess.run(["lxc", "list", name, "-c", "4", "--format", "csv"],
                                 capture_output=True, text=True, check=True).stdout
            addr = out.split(" ")[0].strip() if out.strip() else ""
            if addr:
                try:
                    if requests.get(f"http://{addr}:8080/readyz", timeout=2).status_code == 200:
                        return time.monotonic() - t0
                except requests.RequestException:
                    pass
            time.sleep(0.2)
        return float("nan")
    finally:
        subprocess.run(["lxc", "delete", "-f", name], capture_output=True, check=False)


def dir_pool() -> str:
    """The default profile's pool (``default``, the dir pool up.sh creates)."""
    out = subprocess.run(["lxc", "profile", "device", "get", "default", "root", "pool"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return out or "default"


def warm(cloud: LXDCloud, release: str) -> float:
    """Unpack ``release`` into its image volume on the copy-on-write pool with the bake's own
    step (packer/bake.py ``warm_on_cow_pool``); seconds taken."""
    import importlib.util

    rel = cloud.find_release(release)
    if rel is None:
        raise SystemExit(f"no image for {release}: make image RELEASE={release}")
    spec = importlib.util.spec_from_file_location("bake", ROOT / "packer" / "bake.py")
    bake = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(bake)  # type: ignore[union-attr]
    took = bake.warm_on_cow_pool(rel.name)
    if took is None:
        raise SystemExit(f"could not warm {rel.name} on {cloud.pool}: see the warning above")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default="e2e-a")
    ap.add_argument("--b", default="e2e-b")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    con = Console(stderr=True)
    os.environ.update(lxc_env())  # `lxc` in MODELSERVE_LXD_PROJECT, like the rollout tool
    cloud = LXDCloud()
    env = f"bench{secrets.token_hex(2)}"
    results: dict = {"env": env, "a": args.a, "b": args.b, "rounds": args.rounds,
                     "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "pool": cloud.pool or "(profile default)",
                     "loadavg_start": os.getloadavg()[0]}
    try:
        # before: the dir pool (the profile's), where every launch unpacks the image
        results["baseline_bare_launch_dir_pool_s"] = round(
            baseline_launch(cloud, args.b, dir_pool()), 3)
        if cloud.pool:
            # what `make image` does after publishing (packer/bake.py warm_on_cow_pool)
            for release in (args.a, args.b):
                results.setdefault("warm_s", {})[release] = warm(cloud, release)
            results["baseline_bare_launch_cow_pool_s"] = round(
                baseline_launch(cloud, args.b, cloud.pool), 3)
        first = rollout("deploy", "--env", env, "--release", args.a, "--no-probe")
        results["first_deploy_s"] = first["seconds"]
        deploys, rollbacks, forwards, switch, failed, total = [], [], [], [], 0, 0
        steps: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            d = rollout("deploy", "--env", env, "--release", args.b)  # fresh instances of B
            deploys.append(d["seconds"])
            switch.append(d["switch_to_traffic_s"])
            for kind, secs in (d.get("timings") or {}).items():
                steps.setdefault(kind, []).append(secs)
            r = rollout("rollback", "--env", env)
            rollbacks.append(r["seconds"])
            f = rollout("deploy", "--env", env, "--release", args.b)  # B is warm now
            forwards.append(f["seconds"])
            for res in (d, r, f):
                failed += res["probe"]["failed"]
                total += res["probe"]["total"]
            rollout("rollback", "--env", env)
            # retire B so the next round launches it fresh
            for inst in cloud.list_instances(env):
                if inst.release == args.b:
                    cloud.delete_instance(inst.id)
        results.update({
            "deploy_new_instances_s": deploys, "rollback_s": rollbacks,
            "deploy_warm_s": forwards, "switch_to_traffic_s": switch,
            "probe_failed": failed, "probe_total": total, "deploy_steps_s": steps,
        })
    finally:
        for inst in cloud.list_instances(env):
            cloud.delete_instance(inst.id)
        fip = cloud.find_floating_ip(env)
        if fip:
            cloud.delete_floating_ip(fip)

    def med(key: str) -> float:
        return round(statistics.median(results[key]), 3)

    t = Table("measure", "median s", "goal", "runs")
    t.add_row("baseline: bare lxc launch + seed -> /readyz 200, dir pool",
              f"{results['baseline_bare_launch_dir_pool_s']:.3f}", "-", "1")
    if "baseline_bare_launch_cow_pool_s" in results:
        t.add_row(f"  the same on the copy-on-write pool {cloud.pool} (warmed image)",
                  f"{results['baseline_bare_launch_cow_pool_s']:.3f}", "-", "1")
        t.add_row("  warming an image on it (done by make image), per image",
                  f"{statistics.median(results['warm_s'].values()):.3f}", "-",
                  str(len(results["warm_s"])))
    t.add_row(f"rollout deploy (new instances, gated, switched) on {results['pool']}",
              f"{med('deploy_new_instances_s')}", "<= 20", str(len(results["deploy_new_instances_s"])))
    for kind, secs in results["deploy_steps_s"].items():
        t.add_row(f"  step {kind}", f"{statistics.median(secs):.3f}", "-", str(len(secs)))
    t.add_row("  of which switch -> traffic on new release", f"{med('switch_to_traffic_s')}", "-",
              str(len(results["switch_to_traffic_s"])))
    t.add_row("rollout rollback", f"{med('rollback_s')}", "<= 2", str(len(results["rollback_s"])))
    t.add_row("rollout deploy of a warm release", f"{med('deploy_warm_s')}", "<= 2",
              str(len(results["deploy_warm_s"])))
    t.add_row("probe failed / total requests during switches",
              f"{results['probe_failed']} / {results['probe_total']}", "0", "-")
    Console().print(t)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"deploy_bench-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(results, indent=2))
    con.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
