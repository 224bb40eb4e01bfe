"""I7 on the real stack: the front's /api/v1/workers lists every Celery worker on its broker
with the model it verified, and rollout's worker gate accepts exactly that."""

from __future__ import annotations

import socket

import pytest
import requests

from rollout import health
from rollout.errors import HealthCheckFailed
from rollout.retry import NotReady


def test_workers_endpoint_names_each_worker_and_its_model(stack, bundle):
    body = requests.get(stack.url + "/api/v1/workers", timeout=10).json()
    assert body["model_sha256"] == bundle.sha256
    mine = [w for w in body["workers"] if w["instance"] == socket.gethostname()]
    assert mine and all(w["model_sha256"] == bundle.sha256 for w in mine), body


def test_rollout_worker_gate_against_the_real_front(stack, bundle):
    host = socket.gethostname()
    assert health.check_workers("127.0.0.1", stack.port, (host,), bundle.sha256)
    with pytest.raises(NotReady, match="not-a-worker"):
        health.check_workers("127.0.0.1", stack.port, (host, "not-a-worker"), bundle.sha256)
    with pytest.raises(HealthCheckFailed, match="serves model sha256"):
        health.check_workers("127.0.0.1", stack.port, (host,), "0" * 64)
