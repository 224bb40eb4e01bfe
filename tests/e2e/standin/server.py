"""A stdlib stand-in for the modelserve app (dev of the rollout tool while no real image exists).

Speaks the app contract's health/version/prediction routes from /etc/modelserve/instance.env
(written by the NoCloud seed) and /opt/standin/model_sha256. ``/opt/standin/fail_readyz``
present -> /readyz answers 503 (a broken release). ``/opt/standin/degrade`` ("fail N" or
"slow N"): N seconds after the first prediction it answers (the health gate's), every route
answers 500 ("fail") or 1.5 s late ("slow"): a release that degrades once it is live.
``/opt/standin/flip`` present -> every prediction is probability 0.75, label 1 (instead of
0.25, label 0): a release whose model flips every label (the model-diff gate's test).
/metrics: ``modelserve_http_requests_total{method,route,status}`` like the real app.

Workers (``--workers``): a stand-in worker has no Celery; it announces itself (hostname, model
sha256) to its front's stand-in every 2 s (the front's address from the seed's broker URL),
and the front lists the announced workers on /api/v1/workers like the real app.
"""

import json
import os
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit


def env():
    out = {}
    for line in Path("/etc/modelserve/instance.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


SHA = Path("/opt/standin/model_sha256").read_text().strip()
_DEGRADE = Path("/opt/standin/degrade")
DEGRADE = _DEGRADE.read_text().split() if _DEGRADE.exists() else []
FIRST_PREDICTION = []  # monotonic time of the first prediction
COUNTS = {}  # (method, route, status) -> n
LOCK = threading.Lock()
FLIP = Path("/opt/standin/flip").exists()
ANSWER = {"probability": 0.75, "label": 1} if FLIP else {"probability": 0.25, "label": 0}


def degraded():
    """'fail' / 'slow' once DEGRADE's seconds have passed since the first prediction."""
    if len(DEGRADE) != 2 or not FIRST_PREDICTION:
        return ""
    return DEGRADE[0] if time.monotonic() - FIRST_PREDICTION[0] >= float(DEGRADE[1]) else ""
WORKERS = {}  # instance -> (entry, last seen)


def announce_forever():
    """A worker: tell the front's stand-in we serve SHA (every 2 s)."""
    while True:
        try:
            host = urlsplit(env().get("MODELSERVE_BROKER_URL", "")).hostname
            if host:
                body = json.dumps({"instance": socket.gethostname(), "model_sha256": SHA,
                                   "node": f"celery@{socket.gethostname()}"}).encode()
                req = urllib.request.Request(f"http://{host}:8080/_standin/register", body,
                                             {"Content-Type": "application/json"})
                urllib.request.urlopen(req, timeout=5).close()
        except OSError:
            pass
        time.sleep(2)


class Handler(BaseHTTPRequestHandler):
    def _send(self, code, body, ctype="application/json"):
        mode = degraded() if self.path != "/metrics" else ""
        if mode == "fail":
            code, body = 500, {"error": "degraded stand-in"}
        elif mode == "slow":
            time.sleep(1.5)
        with LOCK:
            key = (self.command, self.path, code)
            COUNTS[key] = COUNTS.get(key, 0) + 1
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

    def do_GET(self):
        e = env()
        if self.path == "/metrics":
            with LOCK:
                lines = [f'modelserve_http_requests_total{{method="{m}",route="{r}",'
                         f'status="{c}"}} {n}.0' for (m, r, c), n in sorted(COUNTS.items())]
            self._send(200, "\n".join(lines) + "\n", "text/plain; version=0.0.4")
        elif self.path == "/healthz":
            self._send(200, {"status": "ok"})
        elif self.path == "/readyz":
            if os.path.exists("/opt/standin/fail_readyz"):
                self._send(503, {"status": "unavailable", "failing": "model"})
            else:
                self._send(200, {"status": "ready"})
        elif self.path == "/api/v1/workers":
            now = time.monotonic()
            live = [e for e, seen in WORKERS.values() if now - seen < 10]
            self._send(200, {"workers": live})
        elif self.path == "/version":
            self._send(200, {"release": e.get("MODELSERVE_RELEASE"),
                             "colour": e.get("MODELSERVE_COLOUR"),
                             "role": e.get("MODELSERVE_ROLE"),
                             "deploy_id": e.get("MODELSERVE_DEPLOY_ID"),
                             "model_sha256": SHA, "model_version": "standin"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n) or b"{}")
        if self.path == "/_standin/register":
            WORKERS[str(body.get("instance"))] = (body, time.monotonic())
            self._send(200, {"ok": True})
            return
        if not FIRST_PREDICTION:
            FIRST_PREDICTION.append(time.monotonic())
        k = len(body.get("instances", []))
        self._send(200, {"predictions": [ANSWER] * k,
                         "model": {"version": "standin", "sha256": SHA}})


if env().get("MODELSERVE_ROLE") == "worker":
    threading.Thread(target=announce_forever, daemon=True).start()
ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
