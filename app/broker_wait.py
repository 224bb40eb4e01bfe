"""The worker's first connection: wait for a broker that is still starting, without kombu's backoff.

On a fresh instance the worker, the web and RabbitMQ start together; RabbitMQ takes 5 s alone and
about 10 s beside TensorFlow's import on 2 cores. Celery's start-up retry (kombu's
``ensure_connection``: 2, 4, 6 … s apart, not configurable through the app) then left the worker
idle for up to 6 s after the broker was up: measured in a deployed front, the broker was ready at
+10.0 s and the worker's next try came at +13.6 s, on the deploy's critical path (the health gate
waits for a worker). So before the first connection the consumer polls the broker's TCP port
every 0.2 s (bounded), then connects as Celery always does (with its own retries and errors).
"""

from __future__ import annotations

import logging
import socket
import time

from celery.worker.consumer import Consumer as _CeleryConsumer
from celery.worker.state import maybe_shutdown

log = logging.getLogger("modelserve.worker")

POLL_S = 0.2
WAIT_S = 120.0  # then Celery's own retry loop takes over, logging each failure


def wait_for_port(host: str, port: int, timeout: float = WAIT_S, poll: float = POLL_S,
                  callback=lambda: None) -> bool:
    """True once ``host:port`` accepts a TCP connection; False after ``timeout`` seconds.
    ``callback`` runs between tries (Celery's ``maybe_shutdown``: a stop request raises)."""
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(poll, 1.0)):
                return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        callback()
        if not announced:
            log.info("waiting for the broker at %s:%s to accept connections", host, port)
            announced = True
        time.sleep(poll)


class Consumer(_CeleryConsumer):
    """Celery's consumer, with a short-interval wait for the broker before its first connection
    (``worker_consumer = "app.broker_wait:Consumer"``)."""

    def ensure_connected(self, conn):
        if self.first_connection_attempt and conn.hostname:
            port = conn.port or conn.transport.default_port
            wait_for_port(conn.hostname, int(port), callback=maybe_shutdown)
        return super().ensure_connected(conn)
