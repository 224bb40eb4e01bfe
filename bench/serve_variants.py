"""Serving variants of modelserve side by side: each with its own RabbitMQ and Redis, all up at
once, loaded with wrk in interleaved rounds; ratios to the first variant (the baseline).

    python bench/serve_variants.py [--rounds 3] [--duration 5] [--levels 1,16,64]
        [--variant NAME:KEY=VALUE,KEY=VALUE ...] [--out bench/results/serve_variants.json]

Every variant starts as `make bench` starts modelserve (the image units' Environment=, the
seed's worker count and web processes), then applies its KEY=VALUE settings: app settings
(MODELSERVE_*) go to the web and the worker, RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS to its broker.
Without --variant: as deployed, one web process, and two web processes with 2 dispatcher
threads each (the settings docs/performance.md compares).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import app_bench as ab  # noqa: E402
import peer_bench as pb  # noqa: E402

from devtools import services as svc  # noqa: E402

DEFAULT = ["deployed:", "web1:MODELSERVE_WEB_PROCESSES=1",
           "web2x2:MODELSERVE_WEB_PROCESSES=2,MODELSERVE_DISPATCH_THREADS=4"]
ERL_KEY = "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"


class _Broker(svc.RabbitMQ):
    erl_args: str = ""

    def _env(self) -> dict[str, str]:
        env = super()._env()
        if self.erl_args:
            env[ERL_KEY] = self.erl_args
        return env


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """NAME:KEY=VALUE,KEY=VALUE (a value may hold spaces, not commas)."""
    name, _, rest = text.partition(":")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"bench: --variant {text!r}: expected NAME:KEY=VALUE,...")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not (key.startswith("MODELSERVE_") or key == ERL_KEY):
            raise SystemExit(f"bench: --variant {text!r}: {item!r} is not MODELSERVE_*=VALUE "
                             f"or {ERL_KEY}=VALUE")
        settings[key] = value
    return name, settings


def start(name: str, settings: dict[str, str]) -> dict:
    """One variant: its own broker (with its Erlang flags) and Redis, then modelserve as
    `make bench` starts it, with the variant's app settings on top."""
    base = Path(tempfile.mkdtemp(prefix=f"modelserve-variant-{name}-"))
    base.chmod(0o755)
    broker = _Broker(base / "rabbitmq")
    broker.erl_args = settings.get(ERL_KEY, "")
    broker.start()
    redis = svc.Redis(base / "redis").start()
    app = {k: v for k, v in settings.items() if k != ERL_KEY}
    env = svc.app_env(broker, redis, MODELSERVE_RELEASE="bench", **app)
    procs, url, cold = pb.start_modelserve(base, env)
    return {"broker": broker, "redis": redis, "procs": procs, "url": url, "cold_start_s": cold}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--variant", action="append", help="NAME:KEY=VALUE,... (repeatable; "
                        "the first is the baseline)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/serve_variants.json")
    args = parser.parse_args()
    variants = dict(parse_variant(v) for v in (args.variant or DEFAULT))
    if len(variants) < 2:
        raise SystemExit("bench: give at least two distinct --variant names")
    levels = [int(c) for c in args.levels.split(",")]
    if not shutil.which("wrk"):
        raise SystemExit("bench: wrk is not installed (make setup installs it)")
    running: dict[str, dict] = {}
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in variants}
    try:
        for name, settings in variants.items():
            running[name] = start(name, settings)
            print(f"bench: {name} up ({running[name]['cold_start_s']:.1f}s)", file=sys.stderr)
            ab.wrk(running[name]["url"], 4, 2, pb.BODY)  # warm-up
        for r in range(args.rounds):
            for c in levels:
                for name in variants:
                    runs[name].setdefault(f"c{c}", []).append(
                        ab.wrk(running[name]["url"], c, args.duration, pb.BODY))
            print(f"bench: round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for run in running.values():
            for p in run["procs"]:
                svc.stop(p)
            run["redis"].stop()
            run["broker"].stop()
    baseline = next(iter(variants))
    result = {"rounds": args.rounds, "duration_s": args.duration, "baseline": baseline,
              "variants": {}}
    for name, settings in variants.items():
        figures = {}
        for level, values in runs[name].items():
            rps = statistics.median(v["rps"] for v in values)
            base_rps = statistics.median(v["rps"] for v in runs[baseline][level])
            figures[level] = {"rps": rps, "p50_ms": statistics.median(v["p50_ms"] for v in values),
                              "failed": sum(v["failed"] for v in values),
                              "all_rps": [v["rps"] for v in values],
                              "over_baseline": round(rps / base_rps, 3) if base_rps else None}
        result["variants"][name] = {"settings": settings, "figures": figures}
    head = "variant".ljust(12) + "".join(f"{'c=' + str(c) + ' rps':>14}{'p50 ms':>9}"
                                         for c in levels)
    print(head)
    for name, v in result["variants"].items():
        cells = "".join(f"{f['rps']:>7.0f} ({f['over_baseline']:.2f}x){f['p50_ms']:>9.1f}"
                        for f in (v["figures"][f"c{c}"] for c in levels))
        print(name.ljust(12) + cells)
    print(f"(median of {args.rounds} interleaved rounds of {args.duration} s; ratios to {baseline})")
    failed = {n: f for n, v in result["variants"].items() for f in v["figures"].values()
              if f["failed"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"bench: wrote {args.out}", file=sys.stderr)
    if failed:
        print(f"bench: failed requests in {sorted(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
