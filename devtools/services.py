"""Private RabbitMQ and Redis servers plus app processes, for `make run` and the test fixtures.

No systemd here: each server runs as a child process with its own data directory and port, so
tests can restart or kill it without touching anyone else's. Credentials are generated per
node; the broker has no `guest` account (default_user is the generated one).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


class ServiceError(RuntimeError):
    """A service did not start or stop as asked."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None,
              host: str = "127.0.0.1") -> None:
    """Wait until host:port accepts connections (fail early if proc exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise ServiceError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def spawn(args: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """Start a process in its own session with stdout+stderr appended to `log`."""
    with open(log, "ab") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)


def _stop(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass
class RabbitMQ:
    """A RabbitMQ node of our own: own data dir, AMQP port, Erlang node name and user."""

    base: Path
    port: int = field(default_factory=free_port)
    user: str = field(default_factory=lambda: "ms-" + secrets.token_hex(4))
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    vhost: str = "modelserve"
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.vhost}"

    @property
    def node(self) -> str:
        return f"ms{self.port}@localhost"

    def _env(self) -> dict[str, str]:
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")},
            "HOME": "/var/lib/rabbitmq",
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.port + 10000 if self.port < 55000 else self.port - 10000),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "rabbitmq.pid"),
        }

    def start(self, timeout: float = 90) -> RabbitMQ:
        """Start (or restart, keeping its data) the node and wait until AMQP answers."""
        if not Path(RABBITMQ_SERVER).exists():
            raise ServiceError("rabbitmq-server is not installed: run `make setup`")
        for sub in ("mnesia", "log"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            f"default_user = {self.user}\ndefault_pass = {self.password}\n"
            f"default_vhost = {self.vhost}\n"
            "default_permissions.configure = .*\ndefault_permissions.read = .*\n"
            "default_permissions.write = .*\nloopback_users = none\n"
            "log.console = false\nlog.file.level = warning\n"
            "vm_memory_high_watermark.relative = 0.2\ndisk_free_limit.absolute = 200MB\n")
        (self.base / "enabled_plugins").write_text("[].\n")
        rmq = pwd.getpwnam("rabbitmq")
        for path in [self.base, *self.base.rglob("*")]:
            os.chown(path, rmq.pw_uid, rmq.pw_gid)
        self.proc = spawn([RABBITMQ_SERVER], self.base / "server.log", env=self._env(),
                          user=rmq.pw_uid, group=rmq.pw_gid, cwd=self.base)
        self._wait_amqp(timeout)
        return self

    def _wait_amqp(self, timeout: float) -> None:
        from kombu import Connection

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = (self.base / "server.log").read_text(errors="replace")[-2000:]
                raise ServiceError(f"rabbitmq-server exited with {self.proc.returncode}:\n{tail}")
            try:
                with Connection(self.url, connect_timeout=1) as conn:
                    conn.ensure_connection(max_retries=1, timeout=1)
                    return
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.25)
        raise ServiceError(f"RabbitMQ on port {self.port} not ready after {timeout:.0f}s: {last}")

    def stop(self) -> None:
        """Graceful stop (SIGTERM to the Erlang VM); durable data stays for a restart."""
        _stop(self.proc, timeout=40)

    def kill(self) -> None:
        """SIGKILL the node, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def rabbitmqctl(self, *args: str) -> str:
        """Run rabbitmqctl against this node (as the rabbitmq user, sharing its cookie)."""
        rmq = pwd.getpwnam("rabbitmq")
        out = subprocess.run(["/usr/lib/rabbitmq/bin/rabbitmqctl", "-n", self.node, *args],
                             env=self._env(), user=rmq.pw_uid, group=rmq.pw_gid, cwd=self.base,
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise ServiceError(f"rabbitmqctl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout


@dataclass
class Redis:
    """A Redis server of our own (no persistence, password required)."""

    base: Path
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    # like the image (image-scripts/files/redis-server.conf): bounded, evicting results
    # (they all carry a TTL) closest to expiry first
    maxmemory: str = "256mb"
    policy: str = "volatile-ttl"
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20) -> Redis:
        exe = shutil.which("redis-server")
        if not exe:
            raise ServiceError("redis-server is not installed: run `make setup`")
        self.base.mkdir(parents=True, exist_ok=True)
        self.proc = spawn(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass",
             self.password, "--save", "", "--appendonly", "no", "--dir", str(self.base),
             "--daemonize", "no", "--loglevel", "warning", "--maxmemory", self.maxmemory,
             "--maxmemory-policy", self.policy], self.base / "redis.log")
        wait_port(self.port, timeout, self.proc)
        return self

    def stop(self) -> None:
        _stop(self.proc)


def app_env(broker: RabbitMQ, redis: Redis, **extra: str) -> dict[str, str]:
    """Environment for app processes bound to these servers (no instance file)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELSERVE_")}
    env.update({
        "MODELSERVE_INSTANCE_ENV": "/nonexistent",
        "MODELSERVE_BROKER_URL": broker.url,
        "MODELSERVE_RESULT_URL": redis.url,
        "PYTHONPATH": str(ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    })
    env.update(extra)
    return env


def bench_stack(prefix: str, settings: list[str]) -> tuple[Path, RabbitMQ, Redis, dict[str, str]]:
    """A benchmark's private RabbitMQ + Redis in a fresh dir, and the app's environment with
    ``settings`` (``KEY=VALUE`` strings from ``--set``) on top; wrk must be installed."""
    if not shutil.which("wrk"):
        raise SystemExit("bench: wrk is not installed (make setup installs it)")
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o755)
    broker, redis = RabbitMQ(base / "rabbitmq").start(), Redis(base / "redis").start()
    env = app_env(broker, redis, MODELSERVE_RELEASE="bench",
                  **dict(kv.split("=", 1) for kv in settings))
    return base, broker, redis, env


def start_worker(env: dict[str, str], log: Path, concurrency: int = 2,
                 nice: int = 0) -> subprocess.Popen:
    """`python -m app.worker` in its own process group (`nice`: CPU priority, as Nice= would)."""
    prefix = ["nice", "-n", str(nice)] if nice else []
    return spawn([*prefix, sys.executable, "-m", "app.worker"], log, cwd=ROOT,
                 env={**env, "MODELSERVE_WORKER_CONCURRENCY": str(concurrency)})


def start_web(env: dict[str, str], log: Path, port: int, host: str = "127.0.0.1",
              timeout: float = 30) -> subprocess.Popen:
    """`python -m app.serve` on host:port, waiting until it listens."""
    proc = spawn([sys.executable, "-m", "app.serve"], log, cwd=ROOT,
                 env={"MALLOC_ARENA_MAX": "2", **env, "MODELSERVE_PORT": str(port),
                      "MODELSERVE_HOST": host})  # as the unit (image-scripts/files)
    wait_port(port, timeout, proc, host=host)
    return proc


def stop(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM a process group, SIGKILL after `timeout`."""
    _stop(proc, timeout)


def rss_mib(pids: list[int]) -> float:
    """Resident memory of these processes and all their descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    total, todo, seen = 0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo += children.get(pid, [])
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            total += next((int(line.split()[1]) for line in status.splitlines()
                           if line.startswith("VmRSS:")), 0)
        except OSError:
            pass
    return total / 1024
