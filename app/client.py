"""The web process's side of the broker: batched predictions, async tasks, readiness probes.

Diagnostics (broker check, worker ping and identity broadcast, queue depth) go over one broker
connection of their own, one at a time (a lock taken with a timeout: a caller that cannot get
it in time gets Unavailable), never through Celery's connection and producer pools. A Celery
broadcast takes a connection from the app's bounded pool and kombu's mailbox then asks the
producer pool, backed by the same connections, for another: with as many concurrent broadcasts
as pool slots nobody could go on and the web process wedged for good. Here no
diagnostic acquires anything from a shared pool, whatever the number of threads calling.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from amqp.exceptions import MessageNacked
from celery import states
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu import Producer
from kombu.exceptions import OperationalError
from kombu.pidbox import Mailbox

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


# How long a diagnostic waits for the diagnostics connection (another one holds it) before it
# gives up with Unavailable; and the bounds of one diagnostic's broker I/O on it.
DIAGNOSTIC_WAIT = 3.0
DIAGNOSTIC_CONNECT_TIMEOUT = 2.0
DIAGNOSTIC_IO_TIMEOUT = 5.0


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


class _OnceProducer(Producer):
    """A producer whose publish never enters kombu's reconnect loop: without a retry policy
    (the mailbox passes none) `retry=True` retries a lost connection forever. A diagnostic
    that meets a broken connection fails now; the next one reconnects."""

    def publish(self, body, *args, **kwargs):
        kwargs["retry"] = False
        return super().publish(body, *args, **kwargs)


class _OwnConnectionMailbox(Mailbox):
    """Celery's control mailbox publishing on the channel of the connection it is bound to,
    never with a producer from the app's pool (kombu's Mailbox takes one from
    `producer_pool` even when the broadcast was given its own connection)."""

    @contextmanager
    def producer_or_acquire(self, producer=None, channel=None):
        yield producer or _OnceProducer(channel, auto_declare=False)

    @classmethod
    def like(cls, mailbox: Mailbox) -> _OwnConnectionMailbox:
        """This class with `mailbox`'s exchange, serializer and queue settings, no pool."""
        return cls(mailbox.namespace, type=mailbox.type, accept=mailbox.accept,
                   serializer=mailbox.serializer, producer_pool=None,
                   queue_ttl=mailbox.queue_ttl, queue_expires=mailbox.queue_expires,
                   queue_durable=mailbox.queue_durable, queue_exclusive=mailbox.queue_exclusive,
                   reply_queue_ttl=mailbox.reply_queue_ttl,
                   reply_queue_expires=mailbox.reply_queue_expires)


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
        # diagnostics: one connection of their own, one diagnostic at a time
        self._diag_lock = threading.Lock()
        self._diag_conn: Any = None
        self._mailbox = _OwnConnectionMailbox.like(self.celery.control.mailbox)
        self._close_hooks: list[Callable[[], None]] = []
        self.dispatcher = Dispatcher(self._send_and_wait, threads=config.dispatch_threads,
                                     batch_rows=max(config.batch_rows, 1), observe=observe)

    def on_close(self, hook: Callable[[], None]) -> None:
        """Run `hook` first when the client closes (the diagnostics refresher's stop)."""
        self._close_hooks.append(hook)

    def close(self) -> None:
        """Stop the dispatcher and close broker and result-store connections."""
        for hook in self._close_hooks:
            hook()
        self._close_hooks.clear()
        self.dispatcher.close()
        held = self._diag_lock.acquire(timeout=DIAGNOSTIC_WAIT)
        try:
            self._drop_diag_conn(graceful=held)
        finally:
            if held:
                self._diag_lock.release()
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

    def predict(self, rows: list[list[float]],
                timeout: float | None = None) -> tuple[list[float], str]:
        """Synchronous, micro-batched prediction within `timeout` (default: the configured
        one; the readiness smoke prediction passes a shorter one)."""
        return self.dispatcher.predict(
            rows, self.config.predict_timeout if timeout is None else timeout)

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

    # --- diagnostics: on their own connection, one at a time, each bounded -------------------

    @contextmanager
    def _diagnostic(self, wait: float = DIAGNOSTIC_WAIT) -> Iterator[Any]:
        """The diagnostics connection (connected), held for the block; Unavailable when another
        diagnostic holds it for more than `wait` seconds or the broker cannot be reached. A
        connection that failed is dropped: the next diagnostic opens a fresh one."""
        if not self._diag_lock.acquire(timeout=wait):
            raise Unavailable(f"another broker diagnostic is in progress (waited {wait:g}s)")
        try:
            if self._diag_conn is None:
                # read/write timeouts: no broker round trip of a diagnostic waits forever
                self._diag_conn = self.celery.connection_for_write(
                    connect_timeout=DIAGNOSTIC_CONNECT_TIMEOUT,
                    transport_options={"confirm_publish": False,
                                       "read_timeout": DIAGNOSTIC_IO_TIMEOUT,
                                       "write_timeout": DIAGNOSTIC_IO_TIMEOUT})
            conn = self._diag_conn
            errors = (*_TRANSPORT_ERRORS, *conn.connection_errors, *conn.channel_errors)
            try:
                conn.ensure_connection(max_retries=1, timeout=DIAGNOSTIC_CONNECT_TIMEOUT)
                yield conn
            except errors as exc:
                self._drop_diag_conn(graceful=False)
                raise Unavailable(f"broker unreachable: {exc}") from None
        finally:
            self._diag_lock.release()

    def _drop_diag_conn(self, graceful: bool) -> None:
        conn, self._diag_conn = self._diag_conn, None
        if conn is None:
            return
        try:
            # graceful: close handshake (bounded by the I/O timeouts); else drop the socket
            conn.release() if graceful else conn.collect()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass

    def _broadcast(self, command: str, timeout: float, wait: float) -> list[dict[str, Any]]:
        """Replies to a control `command` broadcast to every worker, collected for `timeout`
        seconds, on the diagnostics connection (Celery's ``control.broadcast`` without its
        pools)."""
        with self._diagnostic(wait) as conn:
            try:
                return self._mailbox(conn).multi_call(command, {}, timeout=timeout) or []
            finally:
                self._mailbox.unclaimed.clear()  # late replies to earlier calls: nobody waits

    def check_broker(self, wait: float = DIAGNOSTIC_WAIT) -> None:
        """Raise Unavailable unless the broker answers a round trip now (within about 2 s)."""
        with self._diagnostic(wait) as conn:
            # a passive declare of a built-in exchange: a round trip that changes nothing
            conn.default_channel.exchange_declare("amq.direct", "direct", passive=True)

    def check_workers(self, timeout: float = 1.0, wait: float = DIAGNOSTIC_WAIT) -> int:
        """Number of workers answering a ping; raise Unavailable if none."""
        replies = self._broadcast("ping", timeout, wait)
        if not replies:
            raise Unavailable(f"no worker answered a ping within {timeout:.1f}s")
        return len(replies)

    def workers(self, timeout: float = 1.0, wait: float = DIAGNOSTIC_WAIT) -> list[dict[str, Any]]:
        """Every worker that answers the ``modelserve_model`` broadcast within ``timeout``:
        ``{"node", "instance", "role", "model_sha256"}`` (sha None when it cannot say)."""
        from app.worker import IDENTITY_COMMAND

        return workers_from_replies(self._broadcast(IDENTITY_COMMAND, timeout, wait))

    def queue_depth(self, wait: float = DIAGNOSTIC_WAIT) -> int | None:
        """Messages waiting in the predict queue (None if the broker cannot say now)."""
        try:
            with self._diagnostic(wait) as conn:
                # its own channel: a queue not declared yet fails that channel only
                channel = conn.channel()
                try:
                    declared = channel.queue_declare(QUEUE, passive=True)
                except conn.channel_errors:
                    return None  # no such queue yet (no worker or publisher declared it)
                finally:
                    try:
                        channel.close()
                    except Exception:  # noqa: BLE001 - the broker closed it already
                        pass
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
