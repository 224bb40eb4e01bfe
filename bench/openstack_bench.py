"""OpenStack-path benchmark: the harness's bring-up, and deploy/rollback through real Nova/Neutron.

Measures, in one run and on the same machine:
  * bring-up: `up` from everything stopped (state dir kept: the CI-after-SIGKILL case) and,
    with --fresh, from an empty state dir (schemas created anew);
  * baseline: one bare Neutron ``update_ip(port_id=…, if_revision=…)`` (the floor of a switch)
    and one bare Nova boot of a server until ACTIVE (the floor of a launch);
  * ``rollout deploy`` of a new release: start -> the floating IP serves it;
  * ``rollout rollback`` and a forward re-deploy, with the probe's failed requests.
Prints a table, writes bench/results/openstack_bench-<time>.json.

Usage: python bench/openstack_bench.py [--rounds N] [--fresh]
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


def timed(fn, *args):
    t0 = time.monotonic()
    out = fn(*args)
    return time.monotonic() - t0, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rollback/forward rounds")
    parser.add_argument("--fresh", action="store_true", help="also time a bring-up from nothing")
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

    conn = seed.connect(h)
    env = dict(os.environ, OS_CLIENT_CONFIG_FILE=str(h.layout.clouds_yaml),
               OS_CLOUD=config.CLOUD, PYTHONPATH=str(ROOT))
    meta = json.loads((ROOT / "app/bundle/metadata.json").read_text())
    tag = secrets.token_hex(3)
    rels, images = [f"b{tag}-a", f"b{tag}-b"], []
    for n, rel in enumerate(rels):
        images.append(seed.upload_image(conn, rel, rel.encode(), {
            "modelserve_model_sha256": meta["sha256"],
            "modelserve_model_accuracy": str(meta["metrics"]["accuracy"]),
            "modelserve_built_at": f"2026-01-0{n + 1}T00:00:00Z",
            "modelserve_provenance": "release",
            "modelserve_accuracy_floor": str(meta["accuracy_floor"])}))
    env_name = f"bench{tag}"
    net = conn.network.find_network(seed.NETWORK)
    flavor = conn.compute.find_flavor(seed.FLAVOR)
    public = conn.network.find_network(seed.PUBLIC)
    try:
        # baselines: the bare API operations a deploy is made of
        t0 = time.monotonic()
        bare = conn.compute.create_server(name=f"bench-bare-{tag}", image_id=images[0].id,
                                          flavor_id=flavor.id, networks=[{"uuid": net.id}])
        bare = conn.compute.wait_for_server(bare, wait=120, interval=0.2)
        rows.append(("baseline: bare Nova boot until ACTIVE (no app, no gate)",
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
        for s in conn.compute.servers(tags=f"modelserve-env-{env_name}"):
            conn.compute.delete_server(s.id)
        for ip in conn.network.ips(tags=f"modelserve-env-{env_name}"):
            conn.network.delete_ip(ip.id)
        for img in images:
            conn.image.delete_image(img.id, ignore_missing=True)

    table = Table(title="OpenStack path (real Keystone/Nova/Neutron on loopback)")
    table.add_column("what")
    table.add_column("seconds", justify="right")
    table.add_column("notes")
    for what, secs, note in rows:
        table.add_row(what, f"{secs:.2f}", note)
    Console().print(table)
    result["rows"] = [{"what": w, "seconds": round(s, 3), "notes": n} for w, s, n in rows]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"openstack_bench-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(result, indent=2))
    con.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
