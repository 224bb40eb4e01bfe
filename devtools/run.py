"""`make run`: RabbitMQ + Redis (unless ours already run) + one worker + waitress on :8080.

Ctrl-C stops what this command started. Credentials are generated on first start and kept in
.run/dev.env (gitignored) so a second `make run` can reuse servers that are still up.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time

import requests

from devtools import services as svc

RUN = svc.ROOT / ".run"
AMQP_PORT, REDIS_PORT = 5679, 6389


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _load_saved() -> dict[str, str]:
    path = RUN / "dev.env"
    if not path.exists():
        return {}
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def main() -> int:
    RUN.mkdir(exist_ok=True)
    os.chmod(RUN, 0o755)
    web_port = int(os.environ.get("MODELSERVE_PORT", "8080"))
    if _listening(web_port):
        print(f"make run: port {web_port} is taken; set MODELSERVE_PORT", file=sys.stderr)
        return 2
    saved = _load_saved()
    started: list = []
    broker = svc.RabbitMQ(RUN / "rabbitmq", port=AMQP_PORT)
    redis = svc.Redis(RUN / "redis", port=REDIS_PORT)
    if saved and _listening(AMQP_PORT) and _listening(REDIS_PORT):
        broker.user, broker.password = saved["BROKER_USER"], saved["BROKER_PASSWORD"]
        redis.password = saved["REDIS_PASSWORD"]
        print("make run: reusing RabbitMQ and Redis that are already running", file=sys.stderr)
    else:
        for port in (AMQP_PORT, REDIS_PORT):
            if _listening(port):
                print(f"make run: port {port} is taken by something else", file=sys.stderr)
                return 2
        shutil.rmtree(RUN / "rabbitmq", ignore_errors=True)
        print("make run: starting RabbitMQ and Redis …", file=sys.stderr)
        started += [broker.start(), redis.start()]
        (RUN / "dev.env").write_text(f"BROKER_USER={broker.user}\nBROKER_PASSWORD={broker.password}\n"
                                     f"REDIS_PASSWORD={redis.password}\n")
        os.chmod(RUN / "dev.env", 0o600)
    env = svc.app_env(broker, redis, MODELSERVE_RELEASE="dev", MODELSERVE_LOG_LEVEL="INFO")
    procs = []
    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        procs.append(svc.start_worker(env, RUN / "worker.log"))
        procs.append(svc.start_web(env, RUN / "web.log", web_port, host="127.0.0.1"))
        url = f"http://127.0.0.1:{web_port}"
        deadline = time.monotonic() + 90
        while not stop and time.monotonic() < deadline:
            try:
                if requests.get(url + "/readyz", timeout=10).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        print(f"make run: serving {url}  (logs in .run/, Ctrl-C stops)", file=sys.stderr)
        while not stop:
            for p in procs:
                if p.poll() is not None:
                    print(f"make run: {p.args[-1]} exited with {p.returncode}; see .run/*.log",
                          file=sys.stderr)
                    return 1
            time.sleep(0.5)
        return 0
    finally:
        print("make run: stopping …", file=sys.stderr)
        for p in reversed(procs):
            svc.stop(p)
        for s in reversed(started):
            s.stop()


if __name__ == "__main__":
    sys.exit(main())
