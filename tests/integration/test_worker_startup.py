"""A worker started before its broker (a fresh instance starts both at once) waits for the
broker's port instead of failing into kombu's 2-4-6 s backoff, then serves as soon as the broker
accepts. (How much sooner is a figure for bench/deploy_bench.py, not an assertion here.)"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
import requests

from devtools import services as svc
from tests.integration.stack import Stack, teardown_stack

pytestmark = pytest.mark.integration


def _wait_for(path: Path, text: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = path.read_text(errors="replace") if path.exists() else ""
        if text in log:
            return log
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path.name} after {timeout}s:\n{log[-3000:]}")


def test_worker_started_before_the_broker_waits_quietly_then_serves(holdout):
    instances, expected = holdout
    base = Path(tempfile.mkdtemp(prefix="modelserve-test-"))
    os.chmod(base, 0o755)  # the rabbitmq user must reach its data dir
    broker = svc.RabbitMQ(base / "rabbitmq")  # its port is chosen, nothing listens yet
    stack = Stack(base=base, broker=broker, redis=svc.Redis(base / "redis").start(), env={})
    try:
        stack.env = svc.app_env(broker, stack.redis, MODELSERVE_RELEASE="test-r1",
                                MODELSERVE_LOG_LEVEL="INFO", MODELSERVE_DEPLOY_ID="d-test")
        stack.start_worker(concurrency=1)
        log = _wait_for(base / "worker-0.log", "waiting for the broker at 127.0.0.1:"
                        f"{broker.port}")
        assert "Cannot connect" not in log, log[-3000:]

        broker.start()
        stack.port = svc.free_port()
        stack.web = svc.start_web(stack.env, base / "web.log", stack.port)
        stack.wait_ready()
        resp = requests.post(stack.url + "/api/v1/predictions",
                             json={"instances": instances[:3]}, timeout=30)
        assert resp.status_code == 200, resp.text
        got = [p["probability"] for p in resp.json()["predictions"]]
        assert got == pytest.approx(expected[:3], abs=2e-6)
        log = (base / "worker-0.log").read_text(errors="replace")
        # the port accepted before the first AMQP attempt: no failed attempt, no backoff
        assert "Cannot connect" not in log, log[-3000:]
    finally:
        teardown_stack(stack)
