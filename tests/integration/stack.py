"""A real stack: private RabbitMQ + Redis, real Celery workers, real waitress (``build_stack``;
the ``stack`` fixture in conftest.py gives one per test module)."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from devtools import services as svc


@dataclass
class Stack:
    """Handles on the running services and processes of one test stack."""

    base: Path
    broker: svc.RabbitMQ
    redis: svc.Redis
    env: dict[str, str]
    port: int = 0
    web: object = None
    workers: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_worker(self, concurrency: int = 2):
        log = self.base / f"worker-{len(self.workers)}.log"
        proc = svc.start_worker(self.env, log, concurrency)
        self.workers.append(proc)
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers:
            svc.stop(proc)
        self.workers.clear()

    def wait_ready(self, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        body: dict = {}
        while time.monotonic() < deadline:
            try:
                resp = requests.get(self.url + "/readyz", timeout=15)
                body = resp.json()
                if resp.status_code == 200:
                    return body
            except requests.RequestException as exc:
                body = {"error": str(exc)}
            time.sleep(0.3)
        raise AssertionError(f"stack not ready after {timeout}s: {body}\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for log in sorted(self.base.glob("*.log")):
            out.append(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)


def build_stack(predict_timeout: float = 5.0, workers: int = 1, **extra_env: str) -> Stack:
    base = Path(tempfile.mkdtemp(prefix="modelserve-test-"))
    os.chmod(base, 0o755)  # the rabbitmq user must reach its data dir
    broker = svc.RabbitMQ(base / "rabbitmq").start()
    redis = svc.Redis(base / "redis").start()
    env = svc.app_env(broker, redis, MODELSERVE_PREDICT_TIMEOUT=str(predict_timeout),
                      MODELSERVE_RELEASE="test-r1", MODELSERVE_COLOUR="blue",
                      MODELSERVE_DEPLOY_ID="d-test", **extra_env)
    stack = Stack(base=base, broker=broker, redis=redis, env=env)
    for _ in range(workers):
        stack.start_worker()
    stack.port = svc.free_port()
    stack.web = svc.start_web(env, base / "web.log", stack.port)
    stack.wait_ready()
    return stack


def teardown_stack(stack: Stack) -> None:
    svc.stop(stack.web)
    stack.stop_workers()
    stack.redis.stop()
    stack.broker.stop()
