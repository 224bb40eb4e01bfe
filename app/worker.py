"""Worker entry point: `python -m app.worker` (Celery prefork pool on the predict queue)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from app.bundle import BundleError, load_bundle
from app.config import ConfigError, load_config

IDENTITY_COMMAND = "modelserve_model"
_identity: dict[str, str] = {}


def register_identity(model_sha256: str, instance: str, role: str) -> None:
    """Answer the ``modelserve_model`` inspect broadcast with the model this worker verified
    and loads (its sha256), its instance and role: what the front's /api/v1/workers lists."""
    from celery.worker.control import inspect_command

    _identity.update(sha256=model_sha256, instance=instance, role=role)
    if getattr(register_identity, "done", False):
        return

    @inspect_command(name=IDENTITY_COMMAND)
    def _modelserve_model(state, **_kwargs):
        return dict(_identity)

    register_identity.done = True  # type: ignore[attr-defined]


def _queues(spec: str) -> str:
    """MODELSERVE_WORKER_QUEUES: `sync,async` (default), `sync` or `async`: a worker of its own
    for async work leaves the sync worker's processes to synchronous requests."""
    from app.celery_app import ASYNC_QUEUE, QUEUE

    names = {"sync": QUEUE, "async": ASYNC_QUEUE}
    picked = [p.strip() for p in spec.split(",") if p.strip()]
    if not picked or any(p not in names for p in picked):
        raise ConfigError(f"MODELSERVE_WORKER_QUEUES={spec!r}: a comma-separated list of sync, async")
    return ",".join(names[p] for p in picked)


class AsyncWorker:
    """With both queues (`sync,async`), async work runs in a worker of its own: this one serves
    the sync queue with all its processes, and a child `python -m app.worker` serves the async
    queue with ONE process, MODELSERVE_ASYNC_NICE steps nicer. So async tasks never hold the
    pool processes a synchronous task needs (one worker consuming both queues hands a free
    process either queue's head, and an async backlog always has one), and they get the CPU
    only when synchronous work leaves it. The child gets SIGTERM with this worker (its warm
    shutdown starts at once), dies with it, and is restarted if it exits on its own."""

    def __init__(self, nice: int, argv: list[str]):
        self.nice, self.argv = nice, argv
        self.proc: subprocess.Popen | None = None
        self.stopping = threading.Event()

    def _preexec(self) -> None:
        os.nice(self.nice)
        try:  # PR_SET_PDEATHSIG: SIGTERM if this worker dies without stopping it
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        except (OSError, AttributeError):
            pass

    def _spawn(self) -> subprocess.Popen:
        env = {**os.environ, "MODELSERVE_WORKER_QUEUES": "async",
               "MODELSERVE_WORKER_CONCURRENCY": "1"}
        return subprocess.Popen([sys.executable, "-m", "app.worker", *self.argv], env=env,
                                preexec_fn=self._preexec)

    def start(self) -> None:
        self.proc = self._spawn()
        threading.Thread(target=self._watch, name="async-worker", daemon=True).start()

    def _watch(self) -> None:
        while True:
            rc = self.proc.wait()
            if self.stopping.wait(2.0):
                return
            print(f"modelserve-worker: the async worker exited ({rc}); restarting it",
                  file=sys.stderr)
            self.proc = self._spawn()

    def stop(self, **_kwargs) -> None:
        """Forward the shutdown (Celery's worker_shutting_down: warm or cold)."""
        self.stopping.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 150) -> None:
        self.stop()
        deadline = time.monotonic() + timeout
        while self.proc is not None and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config()
        bundle = load_bundle(config.bundle_dir or None, verify=True)
        queues = _queues(config.source.get("MODELSERVE_WORKER_QUEUES", "sync,async"))
        async_worker = None
        if "," in queues:  # both: async in a worker of its own (AsyncWorker)
            from app.celery_app import QUEUE

            queues, async_worker = QUEUE, AsyncWorker(config.async_nice, list(argv or []))
    except (ConfigError, BundleError) as exc:
        print(f"modelserve-worker: {exc}", file=sys.stderr)
        return 2
    from app import tasks
    from app.celery_app import make_celery

    tasks.configure(str(bundle.path))
    celery = make_celery(config)
    # the broker may still be starting beside us: poll its port instead of kombu's 2-4-6 s backoff
    celery.conf.worker_consumer = "app.broker_wait:Consumer"
    celery.set_default()
    instance = config.instance_name or socket.gethostname()
    register_identity(bundle.sha256, instance, config.role)
    # the instance name after '@': the front's /api/v1/workers lets the gate find each worker
    node = f"modelserve-{config.role}-{os.getpid()}@{instance}"
    if async_worker is not None:
        from celery.signals import worker_shutting_down

        worker_shutting_down.connect(async_worker.stop, weak=False)
        async_worker.start()
    try:
        return _run(celery, config, queues, node, argv)
    finally:
        if async_worker is not None:
            async_worker.wait()


def _run(celery, config, queues: str, node: str, argv: list[str] | None) -> int:
    return celery.worker_main([
        "worker", f"--pool={config.source.get('MODELSERVE_WORKER_POOL', 'prefork')}",
        f"--concurrency={config.worker_concurrency}",
        f"--queues={queues}", f"--hostname={node}",
        f"--loglevel={config.source.get('MODELSERVE_LOG_LEVEL', 'WARNING')}",
        "--without-gossip", "--without-mingle", *(argv or []),
    ]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
