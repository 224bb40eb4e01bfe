#!/usr/bin/env python3
"""Bake benchmark: a full bake (deps layer + release) against an incremental one (deps reused),
image sizes, and launch-to-ready time of the baked image, all measured in the same run.

Uses a private deps layer (--deps-salt), so the shared one and concurrent bakes are untouched;
deletes every image it made. Prints a table; writes bench/results/bake.json.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BAKE = ROOT / "packer" / "bake.py"
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
from localcloud.lxd.project import lxc_env, project_name  # noqa: E402


def bake(release: str, salt: str) -> dict:
    """One bake through packer/bake.py; its --json result."""
    proc = subprocess.run([sys.executable, str(BAKE), "--release", release, "--json",
                           "--env", "ci", "--deps-salt", salt, "--allow-dirty"], text=True,
                          stdout=subprocess.PIPE, timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"bake_bench: bake of {release} failed (exit {proc.returncode})")
    return json.loads(proc.stdout)


def launch_to_ready(image: str, release: str) -> float:
    """Seconds from `lxc launch` (with a front seed) to /readyz 200 from the host."""
    pw, rpw, user = secrets.token_hex(16), secrets.token_hex(16), "ms-bench"
    env = {"MODELSERVE_ROLE": "front", "MODELSERVE_RELEASE": release,
           "MODELSERVE_BROKER_USER": user, "MODELSERVE_BROKER_PASSWORD": pw,
           "MODELSERVE_BROKER_URL": f"amqp://{user}:{pw}@127.0.0.1:5672/modelserve",
           "MODELSERVE_REDIS_PASSWORD": rpw,
           "MODELSERVE_RESULT_URL": f"redis://:{rpw}@127.0.0.1:6379/0"}
    user_data = ("#cloud-config\nwrite_files:\n  - path: /etc/modelserve/instance.env\n"
                 "    permissions: \"0600\"\n    content: |\n"
                 + "".join(f"      {k}={v}\n" for k, v in env.items()))
    name = f"ms-bench-{secrets.token_hex(3)}"
    t0 = time.monotonic()
    try:
        subprocess.run(["lxc", "launch", image, name, "-c", f"cloud-init.user-data={user_data}"],
                       check=True, capture_output=True)
        deadline = t0 + 300
        while time.monotonic() < deadline:
            state = json.loads(subprocess.run(["lxc", "query", f"/1.0/instances/{name}/state"
                                               f"?project={project_name()}"],
                                              capture_output=True, text=True).stdout)
            addrs = [a["address"] for a in (state.get("network") or {}).get("eth0", {})
                     .get("addresses", []) if a["family"] == "inet"]
            if addrs:
                try:
                    with urllib.request.urlopen(f"http://{addrs[0]}:8080/readyz", timeout=2) as r:
                        if r.status == 200:
                            return time.monotonic() - t0
                except OSError:
                    pass
            time.sleep(0.5)
        sys.exit("bake_bench: the baked image did not get ready within 300 s")
    finally:
        subprocess.run(["lxc", "delete", "--force", name], capture_output=True)


def main() -> int:
    os.environ.update(lxc_env())  # `lxc` here in MODELSERVE_LXD_PROJECT, like bake.py
    stamp = time.strftime("%m%d%H%M", time.gmtime())
    salt = f"bench-{stamp}-{secrets.token_hex(2)}"
    made: list[str] = []
    deps_size = None
    try:
        full = bake(f"bench-full-{stamp}", salt)
        made += [full["fingerprint"], full["deps_fingerprint"]]
        deps_size = json.loads(subprocess.run(
            ["lxc", "query", f"/1.0/images/{full['deps_fingerprint']}?project={project_name()}"],
            capture_output=True,
            text=True).stdout or "{}").get("size")
        incr = bake(f"bench-incr-{stamp}", salt)
        made.append(incr["fingerprint"])
        ready = launch_to_ready(incr["image"], incr["release"])
    finally:
        for fp in made:
            subprocess.run(["lxc", "image", "delete", fp], capture_output=True)
    rows = [
        ("full bake (deps layer + release layer)", full["total_seconds"], full["size_bytes"]),
        ("  of which deps layer", full["deps_seconds"], deps_size or full.get("size_bytes")),
        ("  of which release layer", full["release_seconds"], None),
        ("incremental bake (deps reused)", incr["total_seconds"], incr["size_bytes"]),
        ("launch -> /readyz 200 (baked image)", round(ready, 1), None),
    ]
    print(f"{'what':42} {'seconds':>8} {'image MiB':>10}")
    for what, secs, size in rows:
        print(f"{what:42} {secs:8.1f} {(f'{size / 2**20:.0f}' if size else ''):>10}")
    speedup = full["total_seconds"] / incr["total_seconds"]
    print(f"incremental vs full: {speedup:.1f}x faster (goal: incremental <= 180 s)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"full": full, "incremental": incr, "launch_to_ready_seconds": round(ready, 1),
           "deps_image_bytes": deps_size, "speedup": round(speedup, 2),
           "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (RESULTS / "bake.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {RESULTS / 'bake.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
