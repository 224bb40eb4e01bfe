"""The web process's side of the broker: batched predictions, async tasks, readiness probes."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from amqp.exceptions import MessageNacked
from celery import states
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.exceptions import OperationalError

from app.celery_app import ASYNC_QUEUE, PREDICT_TASK, QUEUE, make_celery, waiting
from app.codec import pack, unpack
from app.config import Config
from app.dispatch import Dispatcher, ObserveFn, Unavailable
from app.limits import AsyncBusy

_ACCEPTED_PREFIX = "modelserve-accepted-"
# An async task not started by its expiry is dropped by the broker (the message TTL Celery sets
# from `expires`) and never gets a result: after the expiry plus this margin (a task delivered
# just in time is STARTED within it) a lookup reports it expired instead of PENDING forever.
EXPIRY_MARGIN = 5.0
# Errors of the transports underneath: broker (kombu/amqp), result store (redis), sockets.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, OSError)
try:  # redis is a dependency of the result backend
    import redis.exceptions

    _TRANSPORT_ERRORS += (redis.exceptions.RedisError,)
except ImportError:  # pragma: no cover
    pass


class QueueFull(Unavailable):
    """The bounded async queue refused the task (the broker nacked the publish): HTTP 503."""


class _AsyncSlot:
    """One async publisher: its own broker connection (publisher confirms), used by one
    thread at a time, connected on first use and reconnected after a transport error."""

    def __init__(self):
        self._conn = self._producer = None

    def producer(self, celery):
        if self._producer is None:
            self._conn = celery.connection_for_write()
            self._producer = celery.amqp.Producer(self._conn, auto_declare=False)
        return self._producer

    def reset(self) -> None:
        conn, self._conn, self._producer = self._conn, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:  # noqa: BLE001 - closing a broken connection
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
        # async publishes: at most async_inflight at once, each slot with its own connection
        self._async_slots: queue.LifoQueue[_AsyncSlot] = queue.LifoQueue()
        for _ in range(config.async_inflight):
            self._async_slots.put(_AsyncSlot())
        self._held = threading.local()
        self.dispatcher = Dispatcher(self._send_and_wait, threads=config.dispatch_threads,
                                     batch_rows=max(config.batch_rows, 1), observe=observe)

    def close(self) -> None:
        """Stop the dispatcher and close broker and result-store connections."""
        self.dispatcher.close()
        while True:
            try:
                self._async_slots.get_nowait().reset()
            except queue.Empty:
                break
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
        except TaskRevokedError:
            # its expiry (= the deadline) passed before a worker took it, e.g. while a broker
            # restart redelivered it: the same outcome as a timeout, never a 500
            raise Unavailable(f"no worker started the task within {timeout:.1f}s") from None
        except _TRANSPORT_ERRORS as exc:
            raise Unavailable(f"broker or result store unreachable: {exc}") from None
        return unpack(out["probabilities"]).tolist(), out["sha256"]

    @contextmanager
    def async_admission(self, wait: float = 0.0) -> Iterator[None]:
        """Hold one of the `async_inflight` async publish slots for the block, or raise
        AsyncBusy (HTTP 429) when none frees within `wait` seconds (the web: 0, at once).

        The bound keeps a flood of async requests to a few web threads and a few broker
        connections, so the other threads (synchronous requests) are never all taken."""
        try:
            slot = self._async_slots.get(timeout=wait) if wait > 0 else self._async_slots.get_nowait()
        except queue.Empty:
            raise AsyncBusy(self.config.async_inflight) from None
        self._held.slot = slot
        try:
            yield
        finally:
            self._held.slot = None
            self._async_slots.put(slot)

    def submit_async(self, rows: list[list[float]]) -> str:
        """Publish one task (confirmed by the broker) and return its id. Inside
        `async_admission()` it uses the slot held; else it waits for one."""
        slot = getattr(self._held, "slot", None)
        if slot is None:
            with self.async_admission(wait=self.config.predict_timeout):
                return self.submit_async(rows)
        task_id = str(uuid.uuid4())
        expires_at = time.time() + self.config.async_expires
        try:
            # its own bounded queue; a task not started within async_expires is dropped (the
            # message's TTL) instead of computed for nobody. Through the slot's own producer
            # (not Celery's pool, which closes a connection after any error, so every nack
            # of a full queue cost a new AMQP connection). First without kombu's retry; a
            # transport error gets one more attempt with it (reconnects a connection a broker
            # restart broke).
            for retry in (False, True):
                try:
                    self.celery.send_task(PREDICT_TASK, args=[pack(rows)], queue=ASYNC_QUEUE,
                                          task_id=task_id, expires=self.config.async_expires,
                                          retry=retry, producer=slot.producer(self.celery))
                    break
                except Exception as exc:  # noqa: BLE001 - a nack, or retried once
                    # kombu re-raises the broker's nack as OperationalError from MessageNacked
                    if isinstance(exc, MessageNacked) or isinstance(exc.__cause__, MessageNacked):
                        raise QueueFull(f"the async queue is full ({self.config.async_queue_max} "
                                        "tasks waiting); retry later") from None
                    slot.reset()  # a broken connection: the next attempt opens a fresh one
                    if retry:
                        raise
            # Mark the id as ours (the value: when the task expires unless a worker has
            # started it), so a lookup tells an accepted task from an unknown id. After the
            # publish is safe: nobody knows the id before the 202.
            self.results.client.set(_ACCEPTED_PREFIX + task_id, f"{expires_at:.3f}",
                                    ex=int(self.celery.conf.result_expires))
        except _TRANSPORT_ERRORS as exc:
            raise Unavailable(f"broker or result store unreachable: {exc}") from None
        return task_id

    def task_status(self, task_id: str) -> dict[str, Any] | None:
        """{'state', 'result'|'error'} for an accepted task, or None if the id is unknown."""
        try:
            backend = self.results
            meta = backend.get_task_meta(task_id)
            state = meta["status"]
            if state == states.PENDING:
                accepted = backend.client.get(_ACCEPTED_PREFIX + task_id)
                if accepted is None:
                    return None
                if _expired(accepted):
                    return {"state": states.REVOKED, "error": "TaskRevokedError: expired (not "
                            f"started within {self.config.async_expires:g}s of being accepted)"}
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

    def workers(self, timeout: float = 1.0) -> list[dict[str, Any]]:
        """Every worker that answers the ``modelserve_model`` broadcast within ``timeout``:
        ``{"node", "instance", "role", "model_sha256"}`` (sha None when it cannot say)."""
        from app.worker import IDENTITY_COMMAND

        try:
            replies = self.celery.control.broadcast(IDENTITY_COMMAND, reply=True,
                                                    timeout=timeout)
        except _TRANSPORT_ERRORS as exc:
            raise Unavailable(f"broker unreachable: {exc}") from None
        return workers_from_replies(replies)

    def queue_depth(self) -> int | None:
        """Messages waiting in the predict queue (None if the broker cannot say now)."""
        try:
            with self.celery.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1, timeout=1)
                declared = conn.default_channel.queue_declare(QUEUE, passive=True)
                return int(declared.message_count)
        except Exception:  # a metric must never fail the scrape
            return None


def workers_from_replies(replies: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Flatten Celery broadcast replies ``[{node: answer}]`` into sorted worker entries."""
    out = []
    for reply in replies or []:
        for node, info in (reply or {}).items():
            info = info if isinstance(info, dict) and "error" not in info else {}
            out.append({"node": node,
                        "instance": str(info.get("instance") or node.partition("@")[2]),
                        "role": info.get("role"), "model_sha256": info.get("sha256")})
    return sorted(out, key=lambda w: (w["instance"], w["node"]))


def _expired(marker: bytes) -> bool:
    try:
        return float(marker) + EXPIRY_MARGIN < time.time()
    except ValueError:  # a marker without a deadline
        return False
