"""Async flood: does a flood of `?async=true` requests hurt synchronous latency or memory?

    python bench/async_flood.py [--duration 10] [--flood-conns 32] [--flood-rows 10]
                                [--out bench/results/async_flood.json]

Runs a private devtools stack (RabbitMQ, Redis with maxmemory, one worker, waitress). Measures
synchronous p99 (wrk, 4 connections, one patient per request) idle, then again while a second
wrk floods async requests; reports the ratio, the async requests accepted (202) and refused
(429: every async admission slot taken; 503: the bounded async queue is full), and the peak
Redis used_memory, RabbitMQ memory and async queue depth sampled during the flood. The stack
is modelserve as deployed: worker and web started as their units start them, with the defaults
of app/config.py (async admission MODELSERVE_ASYNC_INFLIGHT, the niced async worker).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.app_bench import LUA, ROW, wait_ready, wrk  # noqa: E402
from devtools import services as svc  # noqa: E402


def wrk_async(url: str, connections: int, duration: int, body: str) -> dict:
    """Flood `?async=true`: requests, accepted (2xx) and refused (non-2xx: 429 when every
    async slot is taken, 503 when the async queue is full)."""
    import re

    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(LUA % body)
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
                          "-s", fh.name, url + "/api/v1/predictions?async=true"],
                         capture_output=True, text=True, check=True).stdout
    os.unlink(fh.name)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    refused = int(bad.group(1)) if bad else 0
    return {"requests": total, "accepted": total - refused, "refused": refused,
            "socket_errors": sum(map(int, errors.groups())) if errors else 0,
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}


class Sampler(threading.Thread):
    """Peak Redis used_memory, RabbitMQ memory and async queue depth, once a second.

    Cheap on purpose: the broker's RSS from /proc (its processes, as bench/peer_bench.py counts
    them) and the queue depth from a passive declare on one AMQP connection. (`rabbitmqctl`
    starts an Erlang VM each call, about half a core for a second: sampling with it loaded the
    machine during the flood alone and skewed the ratio against the flood.)"""

    def __init__(self, broker: svc.RabbitMQ, redis: svc.Redis, broker_url: str):
        super().__init__(daemon=True)
        import redis as redis_py
        from kombu import Connection

        from app.celery_app import ASYNC_QUEUE

        self.broker, self.r = broker, redis_py.Redis(port=redis.port, password=redis.password)
        self.amqp, self.queue = Connection(broker_url), ASYNC_QUEUE
        self.stop = threading.Event()
        self.peak = {"redis_used_memory": 0, "rabbitmq_memory": 0, "async_queue_depth": 0}

    def sample(self) -> dict:
        now = {"redis_used_memory": int(self.r.info("memory")["used_memory"]),
               "rabbitmq_memory": int(svc.rss_mib([self.broker.proc.pid]) * 2**20)}
        try:
            ok = self.amqp.default_channel.queue_declare(self.queue, passive=True)
            now["async_queue_depth"] = int(ok.message_count)
        except Exception:  # noqa: BLE001 -- a sample missed, not a failed bench
            self.amqp = self.amqp.clone()
        for k, v in now.items():
            self.peak[k] = max(self.peak[k], v)
        return now

    def run(self) -> None:
        while not self.stop.wait(1.0):
            self.sample()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--flood-conns", type=int, default=32)
    parser.add_argument("--flood-rows", type=int, default=10, help="rows per async request")
    parser.add_argument("--sync-conns", type=int, default=4)
    parser.add_argument("--async-worker", choices=["deployed", "separate"], default="deployed",
                        help="deployed: one `python -m app.worker` as the unit starts it (the "
                        "sync queue, and the async queue in its child worker: 1 process, "
                        "MODELSERVE_ASYNC_NICE); separate: two workers started apart with "
                        "MODELSERVE_WORKER_QUEUES=sync / async (1 process, nice 10)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/async_flood.json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra MODELSERVE_* settings for the stack")
    args = parser.parse_args()
    base, broker, redis, env = svc.bench_stack("modelserve-flood-", args.set)
    sync_body = json.dumps({"instances": [ROW]})
    flood_body = json.dumps({"instances": [ROW] * args.flood_rows})
    procs = []
    results: dict = {"machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0]},
                     "duration_s": args.duration, "flood_conns": args.flood_conns,
                     "flood_rows": args.flood_rows, "sync_conns": args.sync_conns,
                     "async_worker": args.async_worker,
                     "settings": dict(kv.split("=", 1) for kv in args.set)}
    try:
        port = svc.free_port()
        url = f"http://127.0.0.1:{port}"
        if args.async_worker == "deployed":
            procs.append(svc.start_worker(env, base / "worker.log"))
        else:
            procs.append(svc.start_worker({**env, "MODELSERVE_WORKER_QUEUES": "sync"},
                                          base / "worker.log"))
            procs.append(svc.start_worker({**env, "MODELSERVE_WORKER_QUEUES": "async"},
                                          base / "worker-async.log", concurrency=1, nice=10))
        procs.append(svc.start_web(env, base / "web.log", port))
        wait_ready(url)
        wrk(url, 4, 2, sync_body)  # warm-up
        sampler = Sampler(broker, redis, env["MODELSERVE_BROKER_URL"])
        results["idle"] = wrk(url, args.sync_conns, args.duration, sync_body)
        results["memory_idle"] = sampler.sample()
        print(f"bench: idle sync p99 {results['idle']['p99_ms']:.2f} ms", file=sys.stderr)
        sampler.start()
        flood: dict = {}
        flooder = threading.Thread(target=lambda: flood.update(
            wrk_async(url, args.flood_conns, args.duration + 2, flood_body)))
        flooder.start()
        time.sleep(1.5)  # the queue fills first
        results["flood_sync"] = wrk(url, args.sync_conns, args.duration, sync_body)
        flooder.join()
        sampler.stop.set()
        sampler.join()
        results["flood"] = flood
        results["memory_peak"] = sampler.peak
        time.sleep(2)
        results["memory_after"] = sampler.sample()
    finally:
        for p in reversed(procs):
            svc.stop(p)
        redis.stop()
        broker.stop()
    results["machine"]["loadavg_end"] = os.getloadavg()[0]
    results["sync_p99_ratio"] = round(results["flood_sync"]["p99_ms"] / results["idle"]["p99_ms"], 2)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"bench: wrote {args.out}", file=sys.stderr)
    return 0


def print_table(r: dict) -> None:
    i, f, a = r["idle"], r["flood_sync"], r["flood"]
    print(f"\n{'sync (' + str(r['sync_conns']) + ' conns)':<22} {'req/s':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'failed':>6}")
    for name, m in (("idle", i), ("under async flood", f)):
        print(f"{name:<22} {m['rps']:>9.1f} {m['p50_ms']:>8.2f} {m['p99_ms']:>8.2f} {m['failed']:>6}")
    print(f"\nsync p99 under flood / idle: {r['sync_p99_ratio']:.2f} (goal < 3; async worker: "
          f"{r['async_worker']})")
    print(f"async flood ({r['flood_conns']} conns, {r['flood_rows']} rows each): {a['requests']} "
          f"requests, {a['accepted']} accepted (202), {a['refused']} refused (429/503), "
          f"{a['socket_errors']} socket errors")
    mp, mi = r["memory_peak"], r["memory_idle"]
    print(f"Redis used_memory: idle {mi['redis_used_memory'] / 2**20:.1f} MiB, peak "
          f"{mp['redis_used_memory'] / 2**20:.1f} MiB")
    print(f"RabbitMQ memory: idle {mi.get('rabbitmq_memory', 0) / 2**20:.1f} MiB, peak "
          f"{mp['rabbitmq_memory'] / 2**20:.1f} MiB; async queue depth peak "
          f"{mp['async_queue_depth']}")
    print(f"(load average {r['machine']['loadavg_start']:.1f} → {r['machine']['loadavg_end']:.1f})")


if __name__ == "__main__":
    sys.exit(main())
