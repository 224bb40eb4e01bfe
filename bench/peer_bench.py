"""`make bench`: modelserve as deployed against the peers users would pick, side by side.

    python bench/peer_bench.py [--rounds 3] [--duration 6] [--quick] [--out bench/results/latest.json]

Servers, all up at once and measured in interleaved rounds (median kept), each serving the
committed bundle (app/bundle) with the same request/response shape:
  modelserve   waitress → RabbitMQ → Celery worker → Redis, configured as the image's units
               (image-scripts/files/modelserve-*.service Environment=, the seed's worker and
               web process counts)
  fastapi-1/2  FastAPI + uvicorn, 1 and 2 workers, one tf.function call per request
  bentoml      BentoML with adaptive batching (bench/peers/bentoml_service.py)
Peers run from their own pinned venvs (bench/peers/requirements-*.txt, bench/peers/venvs.py).
wrk at 1, 16 and 64 connections; one 10 000-row request; cold start (process start → first
prediction); RSS of each server's processes (modelserve: web, worker, RabbitMQ and Redis).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import app_bench as ab  # noqa: E402

from bench.peers import report, venvs  # noqa: E402
from devtools import services as svc  # noqa: E402

UNITS = ROOT / "image-scripts/files"
BODY = json.dumps({"instances": [ab.ROW]})


def unit_env(unit: str) -> dict[str, str]:
    """The Environment= of an image unit, without what points at the image's own paths."""
    env: dict[str, str] = {}
    for line in (UNITS / unit).read_text().splitlines():
        if line.startswith("Environment="):
            for kv in line.split("=", 1)[1].split():
                k, v = kv.split("=", 1)
                env[k] = v
    for k in ("MODELSERVE_INSTANCE_ENV", "HOME"):
        env.pop(k, None)
    return env


def deployed(field: str) -> int:
    """What a deploy writes into instance.env (rollout/seed.py's SeedParams default)."""
    from rollout.seed import SeedParams

    return SeedParams.__dataclass_fields__[field].default



def first_prediction(url: str, started: float, timeout: float = 180, proc=None) -> float:
    """Seconds from `started` until a POST of one patient answers 200."""
    while time.monotonic() - started < timeout:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"bench: {proc.args!r} exited with {proc.returncode}")
        try:
            r = requests.post(url + "/api/v1/predictions", data=BODY, timeout=5,
                              headers={"Content-Type": "application/json"})
            if r.status_code == 200:
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise SystemExit(f"bench: {url} gave no prediction within {timeout:.0f}s")


def start_modelserve(base: Path, env: dict) -> tuple[list, str, float]:
    """Web and worker as the image's units and the seed run them; a worker count or web
    process count in `env` (bench/serve_variants.py) wins over the seed's."""
    web_env = {**env, **unit_env("modelserve-web.service")}
    worker_env = {**env, **unit_env("modelserve-worker.service")}
    port = svc.free_port()
    t0 = time.monotonic()
    worker = svc.start_worker(worker_env, base / "worker.log", concurrency=int(
        env.get("MODELSERVE_WORKER_CONCURRENCY", deployed("worker_concurrency"))))
    web = svc.spawn([sys.executable, "-m", "app.serve"], base / "web.log", cwd=ROOT,
                    env={**web_env, "MODELSERVE_PORT": str(port), "MODELSERVE_HOST": "127.0.0.1",
                         "MODELSERVE_WEB_PROCESSES": env.get("MODELSERVE_WEB_PROCESSES",
                                                             str(deployed("web_processes")))})
    url = f"http://127.0.0.1:{port}"
    return [web, worker], url, first_prediction(url, t0, proc=web)


def start_peer(name: str, base: Path) -> tuple[list, str, float]:
    venv = venvs.ensure_venv("bentoml" if name == "bentoml" else "fastapi",
                             log=lambda m: print(m, file=sys.stderr))
    port = svc.free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if name == "bentoml":
        env.update(BENTOML_HOME=str(base / "bentoml"), BENTOML_DO_NOT_TRACK="True")
        args = [str(venv / "bin/python"), "-m", "bentoml", "serve",
                "bench.peers.bentoml_service:Pima", "--host", "127.0.0.1", "--port", str(port)]
    else:
        workers = name.rsplit("-", 1)[1]
        args = [str(venv / "bin/python"), "-m", "uvicorn", "bench.peers.fastapi_app:app",
                "--host", "127.0.0.1", "--port", str(port), "--workers", workers,
                "--log-level", "warning", "--no-access-log"]
    t0 = time.monotonic()
    proc = svc.spawn(args, base / f"{name}.log", env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    return [proc], url, first_prediction(url, t0, proc=proc)


def same_probabilities(urls: dict[str, str], rows: list[dict]) -> dict[str, float]:
    """Max |difference| of each server's probabilities from modelserve's on `rows`."""
    body = json.dumps({"instances": rows})
    got = {name: [p["probability"] for p in requests.post(
        url + "/api/v1/predictions", data=body, headers={"Content-Type": "application/json"},
        timeout=30).json()["predictions"]] for name, url in urls.items()}
    ref = got[report.SUBJECT]
    return {name: max(abs(a - b) for a, b in zip(ref, ps, strict=True)) for name, ps in got.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median kept)")
    parser.add_argument("--duration", type=int, default=6, help="seconds per wrk run")
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--servers", default="modelserve,fastapi-1,fastapi-2,bentoml")
    parser.add_argument("--quick", action="store_true", help="smoke check: 1 round of 2 s")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/latest.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 2
    names = args.servers.split(",")
    if report.SUBJECT not in names:
        raise SystemExit("bench: --servers must include modelserve")
    base, broker, redis, env = svc.bench_stack("modelserve-peers-", [])
    meta = {"machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0]},
            "rounds": args.rounds, "duration_s": args.duration,
            "modelserve_config": {"web_env": unit_env("modelserve-web.service"),
                                  "worker_env": unit_env("modelserve-worker.service"),
                                  "worker_concurrency": deployed("worker_concurrency"),
                                  "web_processes": deployed("web_processes")}}
    procs: dict[str, list] = {}
    urls: dict[str, str] = {}
    cold: dict[str, float] = {}
    levels = [int(c) for c in args.levels.split(",")]
    try:
        for name in names:  # one at a time, so each cold start has the machine to itself
            procs[name], urls[name], cold[name] = (start_modelserve(base, env) if name == report.SUBJECT
                                                   else start_peer(name, base))
            print(f"bench: {name} on {urls[name]} (first prediction after {cold[name]:.1f}s)",
                  file=sys.stderr)
            ab.wrk(urls[name], 4, 2, BODY)  # warm-up
        from app.bundle import load_bundle

        rows = [s["features"] for s in load_bundle(verify=False).metadata["holdout_sample"][:8]]
        diffs = same_probabilities(urls, rows)
        meta["max_probability_diff"] = diffs
        if max(diffs.values()) > 1e-5:
            raise SystemExit(f"bench: the servers disagree on the same rows: {diffs}")
        runs: dict = {}
        for r in range(args.rounds):
            for c in levels:
                for name in names:
                    runs.setdefault((name, f"c{c}"), []).append(ab.wrk(urls[name], c, args.duration, BODY))
            for name in names:
                runs.setdefault((name, "bulk"), []).append(
                    ab.bulk(urls[name], 10_000, 1 if args.quick else 3))
            print(f"bench: round {r + 1}/{args.rounds} done", file=sys.stderr)
        servers = report.summarize(runs)
        extra = [broker.proc.pid, redis.proc.pid]
        for name in names:
            pids = [p.pid for p in procs[name]] + (extra if name == report.SUBJECT else [])
            servers[name].update(rss_mib=round(svc.rss_mib(pids), 1), cold_start_s=round(cold[name], 2))
    finally:
        for plist in procs.values():
            for p in plist:
                svc.stop(p)
        redis.stop()
        broker.stop()
    meta["machine"]["loadavg_end"] = os.getloadavg()[0]
    out = report.result(servers, meta)
    print(report.table(out))
    print(f"(median of {args.rounds} interleaved rounds of {args.duration} s; load average "
          f"{meta['machine']['loadavg_start']:.1f} → {meta['machine']['loadavg_end']:.1f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"bench: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
