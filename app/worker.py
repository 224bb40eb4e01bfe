"""Worker entry point: `python -m app.worker` (Celery prefork pool on the predict queue)."""

from __future__ import annotations

import os
import socket
import sys

from app.bundle import BundleError, load_bundle
from app.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config()
        bundle = load_bundle(config.bundle_dir or None, verify=True)
    except (ConfigError, BundleError) as exc:
        print(f"modelserve-worker: {exc}", file=sys.stderr)
        return 2
    from app import tasks
    from app.celery_app import QUEUE, make_celery

    tasks.configure(str(bundle.path))
    celery = make_celery(config)
    celery.set_default()
    node = f"modelserve-{config.role}-{os.getpid()}@{socket.gethostname()}"
    return celery.worker_main([
        "worker", f"--pool={config.source.get('MODELSERVE_WORKER_POOL', 'prefork')}",
        f"--concurrency={config.worker_concurrency}",
        f"--queues={QUEUE}", f"--hostname={node}",
        f"--loglevel={config.source.get('MODELSERVE_LOG_LEVEL', 'WARNING')}",
        "--without-gossip", "--without-mingle", *(argv or []),
    ]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
