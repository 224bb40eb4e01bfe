"""OpenStack-path benchmark: the harness's bring-up, and deploy/rollback through real Nova/Neutron.

Measures, in one run and on the same machine:
  * bring-up: `up` from everything stopped (state dir kept: the CI-after-SIGKILL case) and,
    with --fresh, from an empty state dir (schemas created anew);
  * baseline: one bare Neutron ``update_ip(port_id=…, if_revision=…)`` (the floor of a switch)
    and one bare Nova boot of a stand-in server until ACTIVE (the floor of a launch);
  * ``rollout deploy`` of a new stand-in release (tests/openstack/standins.py: the Glance base
    + a stdlib app, booted by Nova as an LXD container): start -> the floating IP serves it;
  * ``rollout rollback`` and a forward re-deploy, with the probe's failed requests;
  * the real image on the same LXD compute host: the real Packer openstack bake through Nova
    (``bake_s``: the RELEASE layer; the deps layer is baked through Nova too and reused while
    its key is unchanged, as in the tier), ``rollout deploy`` of it
    (``deploy_s``), and 10 switches (rollback / roll forward; ``rollback_s`` median,
    ``probe_failed`` summed), beside the LXD release-layer bake of the same commit in the same
    run and the latest LXD deploy/rollback figures (bench/deploy_bench.py's file, named).
Prints a table, writes bench/results/openstack.json (and openstack_bench-<time>.json).

Usage: python bench/openstack_bench.py [--rounds N] [--switches N] [--fresh] [--no-lxd-host]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from localcloud.openstack import config, seed  # noqa: E402
from localcloud.openstack.harness import Harness  # noqa: E402


def rollout(env: dict, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-m", "rollout", *args, "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"rollout {' '.join(args)} failed ({res.returncode}): "
                         f"{res.stderr.strip().splitlines()[-1:]}")
    return json.loads(res.stdout)


def remove_env(conn, env_name: str) -> None:
    """Delete the bench env's servers and floating IPs (by rollout's env tag)."""
    for s in conn.compute.servers(tags=f"modelserve-env-{env_name}"):
        conn.compute.delete_server(s.id)
    for ip in conn.network.ips(tags=f"modelserve-env-{env_name}"):
        conn.network.delete_ip(ip.id)


def timed(fn, *args):
    t0 = time.monotonic()
    out = fn(*args)
    return time.monotonic() - t0, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rollback/forward rounds")
    parser.add_argument("--fresh", action="store_true", help="also time a bring-up from nothing")
    parser.add_argument("--switches", type=int, default=10,
                        help="switches (rollback + forward) of the real image on the LXD host")
    parser.add_argument("--no-lxd-host", action="store_true",
                        help="skip the real image's bakes and deploys (stand-ins only)")
    args = parser.parse_args()
    con = Console(stderr=True)
    h = Harness()
    rows: list[tuple[str, float, str]] = []
    result: dict = {"at": datetime.now(timezone.utc).isoformat(), "bring_up": {}}

    if args.fresh:
        h.down()
        shutil.rmtree(h.layout.state, ignore_errors=True)
        secs, steps = timed(h.up)
        result["bring_up"]["fresh"] = steps
        rows.append(("bring-up from an empty state dir (venv cached)", secs, ""))
    h.down()
    secs, steps = timed(h.up)
    result["bring_up"]["restart"] = steps
    rows.append(("bring-up with state kept (after a stop/SIGKILL)", secs, ""))

    from tests.openstack import standins

    conn = seed.connect(h, project=config.LXD_PROJECT_OS)
    env = dict(os.environ, **seed.rollout_env(h), PYTHONPATH=str(ROOT),
               MODELSERVE_ANALYSIS_WINDOW="0")
    meta = json.loads((ROOT / "app/bundle/metadata.json").read_text())
    tag = secrets.token_hex(3)
    rels, images = [f"b{tag}-a", f"b{tag}-b"], []
    for n, rel in enumerate(rels):
        images.append(standins.upload(conn, rel, rel[-1], {
            "modelserve_model_accuracy": str(meta["metrics"]["accuracy"]),
            "modelserve_built_at": f"2026-01-0{n + 1}T00:00:00Z",
            "modelserve_accuracy_floor": str(meta["accuracy_floor"])}))
    env_name = f"bench{tag}"
    net = conn.network.find_network(seed.LXD_NETWORK)
    flavor = conn.compute.find_flavor(seed.FLAVOR_LXD)
    public = conn.network.find_network(seed.LXD_PUBLIC)
    try:
        # baselines: the bare API operations a deploy is made of
        t0 = time.monotonic()
        bare = conn.compute.create_server(name=f"bench-bare-{tag}", image_id=images[0].id,
                                          flavor_id=flavor.id, networks=[{"uuid": net.id}])
        bare = conn.compute.wait_for_server(bare, wait=300, interval=0.2)
        rows.append(("baseline: bare Nova boot of a stand-in until ACTIVE (no gate)",
                     time.monotonic() - t0, ""))
        port = next(iter(conn.network.ports(device_id=bare.id)))
        ip = conn.network.create_ip(floating_network_id=public.id)
        t0 = time.monotonic()
        conn.network.update_ip(ip.id, port_id=port.id, if_revision=ip.revision_number)
        rows.append(("baseline: bare Neutron update_ip (If-Match)", time.monotonic() - t0, ""))
        conn.network.delete_ip(ip.id)
        conn.compute.delete_server(bare.id)

        res = rollout(env, "deploy", "--cloud", "openstack", "--env", env_name,
                      "--release", rels[0], "--no-probe")
        rows.append(("rollout deploy A (new env, FIP allocated)", res["seconds"], ""))
        res = rollout(env, "deploy", "--cloud", "openstack", "--env", env_name,
                      "--release", rels[1])
        result["deploy"] = res["seconds"]
        rows.append(("rollout deploy B: start -> FIP serves B", res["seconds"],
                     f"probe {res['probe']['failed']} failed / {res['probe']['total']}"))
        backs, fwds, failed, total = [], [], 0, 0
        for _ in range(args.rounds):
            r = rollout(env, "rollback", "--cloud", "openstack", "--env", env_name)
            backs.append(r["seconds"])
            failed += r["probe"]["failed"]
            total += r["probe"]["total"]
            r = rollout(env, "rollback", "--cloud", "openstack", "--env", env_name)
            fwds.append(r["seconds"])
            failed += r["probe"]["failed"]
            total += r["probe"]["total"]
        result.update(rollback=backs, forward=fwds, probe_failed=failed, probe_total=total)
        rows.append((f"rollout rollback (median of {args.rounds})", statistics.median(backs),
                     f"probe {failed} failed / {total} over {2 * args.rounds} switches"))
        rows.append((f"rollout roll forward (median of {args.rounds})",
                     statistics.median(fwds), ""))
    finally:
        remove_env(conn, env_name)
        for img in images:
            standins.delete(conn, img.id)

    if not args.no_lxd_host:
        result.update(lxd_host(h, env, rows, args.switches))

    table = Table(title="OpenStack path (real Keystone/Nova/Neutron on loopback)")
    table.add_column("what")
    table.add_column("seconds", justify="right")
    table.add_column("notes")
    for what, secs, note in rows:
        table.add_row(what, f"{secs:.2f}", note)
    Console().print(table)
    if "openstack" in result:
        side = Table(title=f"same commit {result.get('commit')}: OpenStack (LXD host) vs LXD")
        for col in ("figure", "openstack", "lxd"):
            side.add_column(col, justify="left" if col == "figure" else "right")
        o, x = result["openstack"], result["lxd"]
        for key in ("bake_s", "deploy_s", "rollback_s", "probe_failed"):
            side.add_row(key, str(o.get(key)), str(x.get(key)))
        Console().print(side)
        con.print(f"bake_s: release layer on both; LXD deploy/rollback: {x.get('source')}")
    result["rows"] = [{"what": w, "seconds": round(s, 3), "notes": n} for w, s, n in rows]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"openstack_bench-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2))
    (out / "openstack.json").write_text(json.dumps(result, indent=2))
    con.print(f"wrote {path} and {out / 'openstack.json'}")
    return 0


BENCH_LXD_PROJECT = "modelserve-bench"


def bake(env: dict, *args: str) -> dict:
    """`packer/bake.py ARGS --json --env ci --allow-dirty` -> its JSON result."""
    res = subprocess.run([sys.executable, str(ROOT / "packer/bake.py"), *args, "--json",
                          "--env", "ci", "--allow-dirty"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"bake.py {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout)


def latest_lxd_figures() -> dict:
    """The newest bench/deploy_bench.py result (LXD): deploy/rollback/probe, with its file."""
    files = sorted((ROOT / "bench" / "results").glob("deploy_bench-*.json"))
    if not files:
        return {}
    d = json.loads(files[-1].read_text())

    def med(value):
        return statistics.median(value) if isinstance(value, list) and value else value

    return {"source": f"bench/results/{files[-1].name} (not this run)", "at": d.get("at"),
            "deploy_s": med(d.get("deploy_new_instances_s")),
            "rollback_s": med(d.get("rollback_s")), "deploy_s_all": d.get("deploy_new_instances_s"),
            "rollback_s_all": d.get("rollback_s"), "probe_failed": d.get("probe_failed"),
            "probe_total": d.get("probe_total")}


def lxd_host(h, base_env: dict, rows: list, switches: int) -> dict:
    """The real image on the LXD compute host: Packer openstack bakes through Nova (release
    layer), deploy, `switches` switches; and the LXD release-layer bake of the same commit."""
    from localcloud.openstack import lxdhost

    conn = seed.connect(h, project=config.LXD_PROJECT_OS)
    env = dict(base_env, MODELSERVE_LXD_PROJECT=BENCH_LXD_PROJECT)
    env.pop("LXD_CONF", None)
    tag = secrets.token_hex(2)
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True).stdout
    out: dict = {"commit": sha + ("-dirty" if dirty.strip() else ""), "openstack": {},
                 "lxd": {}}
    lxd_rel = f"bl{tag}-lxd"
    lxd = bake(env, "--cloud", "lxd", "--release", lxd_rel)
    out["lxd"].update(bake_s=lxd["release_seconds"], bake_layer="release",
                      deps_s=lxd["deps_seconds"], deps_reused=lxd["deps_reused"])
    rows.append(("LXD: packer lxd bake, release layer (same commit)", lxd["release_seconds"],
                 f"deps layer {'reused' if lxd['deps_reused'] else 'baked'}"))
    subprocess.run(["lxc", "image", "delete", f"modelserve-{lxd_rel}", "--project",
                    BENCH_LXD_PROJECT], capture_output=True)
    deps = bake(env, "--cloud", "openstack", "--deps-only")
    out["openstack"].update(deps_s=deps["deps_seconds"], deps_reused=deps["deps_reused"])
    rows.append(("OpenStack deps layer: packer openstack bake through Nova", deps["deps_seconds"],
                 f"{deps['deps_image']} {'reused' if deps['deps_reused'] else 'baked'}"))
    made, env_name = [], f"bench{tag}"
    try:
        for letter in "ab":
            res = bake(env, "--cloud", "openstack", "--release", f"bo{tag}-{letter}")
            made.append(res)
            rows.append((f"OpenStack: packer openstack bake through Nova, release layer "
                         f"({letter})", res["release_seconds"],
                         f"deps {'reused' if res['deps_reused'] else 'baked'}"))
        rels = [m["release"] for m in made]
        out["openstack"].update(bake_s=made[0]["release_seconds"], bake_layer="release",
                                bake_s_all=[m["release_seconds"] for m in made])
        first = rollout(env, "deploy", "--cloud", "openstack", "--env", env_name,
                        "--release", rels[0], "--no-probe")
        rows.append(("OpenStack/LXD host: rollout deploy A (new env, first boot, import)",
                     first["seconds"], ""))
        res = rollout(env, "deploy", "--cloud", "openstack", "--env", env_name,
                      "--release", rels[1])
        rows.append(("OpenStack/LXD host: rollout deploy B: start -> FIP serves B",
                     res["seconds"], f"probe {res['probe']['failed']} failed / "
                     f"{res['probe']['total']}"))
        backs, fwds, failed, total = [], [], 0, 0
        for n in range(switches):
            r = rollout(env, "rollback", "--cloud", "openstack", "--env", env_name)
            (backs if n % 2 == 0 else fwds).append(r["seconds"])
            failed += r["probe"]["failed"]
            total += r["probe"]["total"]
        out["openstack"].update(deploy_s=res["seconds"], first_deploy_s=first["seconds"],
                                rollback_s=statistics.median(backs),
                                forward_s=statistics.median(fwds) if fwds else None,
                                probe_failed=failed, probe_total=total, switches=switches)
        rows.append((f"OpenStack/LXD host: rollout rollback (median of {len(backs)})",
                     statistics.median(backs),
                     f"probe {failed} failed / {total} over {switches} switches"))
    finally:
        remove_env(conn, env_name)
        for m in made:
            conn.image.delete_image(m["image_id"], ignore_missing=True)
            lxdhost.lxc("image", "delete", f"glance-{m['image_id']}", "--project",
                        config.LXD_PROJECT, check=False)
    out["lxd"].update(latest_lxd_figures())
    return out


if __name__ == "__main__":
    sys.exit(main())
