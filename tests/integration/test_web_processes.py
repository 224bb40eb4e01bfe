"""A front of several web processes (MODELSERVE_WEB_PROCESSES, app.serve.serve_processes),
against the real stack: they share the port, every process serves, `/metrics` is the front's
(the canary analysis reads it), and a process that dies stops the front with a failure."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from devtools import services as svc
from rollout.analysis import parse_metrics

pytestmark = pytest.mark.integration

JSON = {"Content-Type": "application/json"}
ROW = {"npreg": 1, "glu": 89, "bp": 66, "skin": 23, "bmi": 28.1, "ped": 0.167, "age": 21}


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def _start(stack, name: str, processes: int = 2):
    port = svc.free_port()
    env = {**stack.env, "MODELSERVE_WEB_PROCESSES": str(processes)}
    web = svc.start_web(env, stack.base / f"{name}.log", port)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while len(_children(web.pid)) < processes - 1 or requests.get(
            url + "/readyz", timeout=15).status_code != 200:
        assert time.monotonic() < deadline, (stack.base / f"{name}.log").read_text()[-2000:]
        time.sleep(0.2)
    return web, url


def _predictions_200(text: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if (line.startswith("modelserve_http_requests_total{") and 'status="200"' in line
                and "predictions" in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_processes_share_the_port_and_metrics_are_the_fronts(stack):
    web, url = _start(stack, "web-2p")
    try:
        (child,) = _children(web.pid)
        cpu = {pid: _cpu_s(pid) for pid in (web.pid, child)}
        body = json.dumps({"instances": [ROW]})
        sent = 0
        deadline = time.monotonic() + 120
        # fresh connections, 8 at a time, until each process has spent CPU on requests: the
        # kernel spreads connections over both listening sockets
        while time.monotonic() < deadline:
            conns = [requests.Session() for _ in range(8)]
            for s in conns:
                with s:
                    assert s.post(url + "/api/v1/predictions", data=body, headers=JSON,
                                  timeout=30).status_code == 200
                sent += 1
            if sent >= 200 and all(_cpu_s(p) - c > 0.3 for p, c in cpu.items()):
                break
        grown = {p: round(_cpu_s(p) - c, 2) for p, c in cpu.items()}
        assert all(g > 0.3 for g in grown.values()), f"a process served nothing: {grown}"
        # whichever process answers /metrics, it counts every process's requests
        for _ in range(10):
            with requests.Session() as s:
                text = s.get(url + "/metrics", timeout=15).text
            assert _predictions_200(text) == sent, text[:2000]
            counts = parse_metrics(text)
            assert counts is not None and counts.requests >= sent and counts.errors == 0
        assert "modelserve_queue_depth" in text
    finally:
        svc.stop(web)
    assert web.returncode == 0, (stack.base / "web-2p.log").read_text()[-2000:]


def test_sigterm_stops_every_process_and_frees_the_port(stack):
    web, url = _start(stack, "web-term", processes=3)
    children = _children(web.pid)
    assert len(children) == 2
    port = int(url.rsplit(":", 1)[1])
    web.send_signal(signal.SIGTERM)  # the unit's KillMode=mixed: the main process only
    assert web.wait(60) == 0, (stack.base / "web-term.log").read_text()[-2000:]
    for pid in children:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_dead_process_stops_the_front_with_a_failure(stack):
    web, url = _start(stack, "web-kill")
    (child,) = _children(web.pid)
    os.kill(child, signal.SIGKILL)
    # the survivor drains and exits 1: the unit's Restart=on-failure starts the front whole
    assert web.wait(60) == 1, (stack.base / "web-kill.log").read_text()[-2000:]
    assert "exited (signal 9): stopping the front" in (stack.base / "web-kill.log").read_text()


def test_port_in_use_fails_at_start(stack):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        env = {**stack.env, "MODELSERVE_WEB_PROCESSES": "2", "MODELSERVE_PORT": str(port),
               "MODELSERVE_HOST": "127.0.0.1"}
        log = stack.base / "web-inuse.log"
        proc = svc.spawn([sys.executable, "-m", "app.serve"], log, cwd=svc.ROOT, env=env)
        assert proc.wait(30) == 2
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in log.read_text()
        assert _children(proc.pid) == []
    finally:
        holder.close()
