"""The web process's side of the broker: batched predictions, async tasks, readiness probes."""

from __future__ import annotations

import uuid
from typing import Any

from celery import states
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.exceptions import OperationalError

from app.celery_app import PREDICT_TASK, QUEUE, make_celery, waiting
from app.codec import pack, unpack
from app.config import Config
from app.dispatch import Dispatcher, ObserveFn, Unavailable

_ACCEPTED_PREFIX = "modelserve-accepted-"
# Errors of the transports underneath: broker (kombu/amqp), result store (redis), sockets.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, OSError)
try:  # redis is a dependency of the result backend
    import redis.exceptions

    _TRANSPORT_ERRORS += (redis.exceptions.RedisError,)
except ImportError:  # pragma: no cover
    pass


class BrokerClient:
    """Publishes prediction tasks and reads their results; maps transport errors to 503s."""

    def __init__(self, config: Config, observe: ObserveFn | None = None):
        self.config = config
        self.celery = make_celery(config, name="modelserve-web")
        # Synchronous batches skip publisher confirms (~1.5 ms each): a lost publish shows up as
        # that request's own 503 at its deadline, while a 202 must mean the broker has the task.
        self.celery_sync = make_celery(config, name="modelserve-web-sync", confirm_publish=False)
        # Celery keeps a backend per thread; lookups and marks share this one instead, so
        # request threads never open Redis connections of their own (thread-safe pool).
        self.results = self.celery._get_backend()
        self.dispatcher = Dispatcher(self._send_and_wait, threads=config.dispatch_threads,
                                     batch_rows=max(config.batch_rows, 1), observe=observe)

    def close(self) -> None:
        """Stop the dispatcher and close broker and result-store connections."""
        self.dispatcher.close()
        for celery in (self.celery, self.celery_sync):
            celery.amqp.producer_pool.force_close_all()
            celery.close()
        self.results.client.close()
        self.results.client.connection_pool.disconnect()

    def predict(self, rows: list[list[float]]) -> tuple[list[float], str]:
        """Synchronous, micro-batched prediction within the configured timeout."""
        return self.dispatcher.predict(rows, self.config.predict_timeout)

    def _send_and_wait(self, rows: list[list[float]], timeout: float) -> tuple[list[float], str]:
        try:
            with waiting():
                # transient: a synchronous task is worthless after its deadline, so the
                # broker need not write it to disk
                result = self.celery_sync.send_task(PREDICT_TASK, args=[pack(rows)], queue=QUEUE,
                                                    expires=timeout, delivery_mode=1)
            try:
                out = result.get(timeout=timeout, propagate=True, disable_sync_subtasks=False)
            finally:
                result.forget()
        except CeleryTimeout:
            raise Unavailable(f"no worker answered within {timeout:.1f}s "
                              "(are the workers running?)") from None
        except _TRANSPORT_ERRORS as exc:
            raise Unavailable(f"broker or result store unreachable: {exc}") from None
        return unpack(out["probabilities"]).tolist(), out["sha256"]

    def submit_async(self, rows: list[list[float]]) -> str:
        """Publish one task (confirmed by the broker) and return its id."""
        task_id = str(uuid.uuid4())
        try:
            # Mark the id as ours before publishing, so a lookup never confuses an accepted
            # task with an unknown id, whatever the worker's speed.
            self.results.client.set(_ACCEPTED_PREFIX + task_id, "1",
                                    ex=int(self.celery.conf.result_expires))
            self.celery.send_task(PREDICT_TASK, args=[pack(rows)], queue=QUEUE, task_id=task_id)
        except _TRANSPORT_ERRORS as exc:
            raise Unavailable(f"broker or result store unreachable: {exc}") from None
        return task_id

    def task_status(self, task_id: str) -> dict[str, Any] | None:
        """{'state', 'result'|'error'} for an accepted task, or None if the id is unknown."""
        try:
            backend = self.results
            meta = backend.get_task_meta(task_id)
            state = meta["status"]
            if state == states.PENDING and not backend.client.exists(_ACCEPTED_PREFIX + task_id):
                return None
        except _TRANSPORT_ERRORS as exc:
            raise Unavailable(f"result store unreachable: {exc}") from None
        out: dict[str, Any] = {"state": state}
        if state == states.SUCCESS:
            res = meta["result"]
            out["result"] = {"probabilities": unpack(res["probabilities"]).tolist(),
                             "sha256": res["sha256"]}
        elif state in states.PROPAGATE_STATES:
            out["error"] = f"{type(meta['result']).__name__}: {meta['result']}"
        return out

    def check_broker(self) -> None:
        """Raise Unavailable unless a broker connection can be made now."""
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
        except _TRANSPORT_ERRORS as exc:
            raise Unavailable(f"broker unreachable: {exc}") from None

    def check_workers(self, timeout: float = 1.0) -> int:
        """Number of workers answering a ping; raise Unavailable if none."""
        try:
            replies = self.celery.control.ping(timeout=timeout)
        except _TRANSPORT_ERRORS as exc:
            raise Unavailable(f"broker unreachable: {exc}") from None
        if not replies:
            raise Unavailable(f"no worker answered a ping within {timeout:.1f}s")
        return len(replies)

    def queue_depth(self) -> int | None:
        """Messages waiting in the predict queue (None if the broker cannot say now)."""
        try:
            with self.celery.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1, timeout=1)
                declared = conn.default_channel.queue_declare(QUEUE, passive=True)
                return int(declared.message_count)
        except Exception:  # a metric must never fail the scrape
            return None
