"""Worker entry point: `python -m app.worker` (Celery prefork pool on the predict queue)."""

from __future__ import annotations

import os
import socket
import sys

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


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config()
        bundle = load_bundle(config.bundle_dir or None, verify=True)
        queues = _queues(config.source.get("MODELSERVE_WORKER_QUEUES", "sync,async"))
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
    return celery.worker_main([
        "worker", f"--pool={config.source.get('MODELSERVE_WORKER_POOL', 'prefork')}",
        f"--concurrency={config.worker_concurrency}",
        f"--queues={queues}", f"--hostname={node}",
        f"--loglevel={config.source.get('MODELSERVE_LOG_LEVEL', 'WARNING')}",
        "--without-gossip", "--without-mingle", *(argv or []),
    ]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
