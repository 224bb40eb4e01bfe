"""The Celery app shared by the web process (client) and the workers. Imports no TensorFlow."""

from __future__ import annotations

import ssl
import threading

from celery import Celery
from celery.backends.redis import RedisBackend
from kombu import Exchange, Queue

from app.config import Config

QUEUE = "modelserve.predict"
# Async work waits in its own bounded queue. A new name (not an argument added to an existing
# queue): RabbitMQ refuses to redeclare a durable queue with other arguments.
ASYNC_QUEUE = "modelserve.async.v1"
PREDICT_TASK = "modelserve.predict"
_waiting = threading.local()


class ResultBackend(RedisBackend):
    """Redis result backend that subscribes to a result only when the calling thread waits.

    Why Redis: results must outlive a RabbitMQ restart (a 202-accepted task is fetched later,
    possibly by another web thread), and worker-only instances must reach the same store;
    `rpc://` keeps results in a per-client reply queue, which docs/design.md records break when client
    threads were replaced. Why this subclass: the stock backend subscribes on every publish,
    so fire-and-forget (async) publishes from request threads would pile up subscriptions on
    sockets nobody drains. Only the dispatcher's fixed threads wait, inside `waiting()`.
    """

    def on_task_call(self, producer, task_id):
        if getattr(_waiting, "flag", False):
            super().on_task_call(producer, task_id)


class waiting:  # noqa: N801 - used as a context manager, reads as a phrase
    """Mark the current thread as one that will wait for the task it publishes."""

    def __enter__(self):
        _waiting.flag = True

    def __exit__(self, *exc):
        _waiting.flag = False


def make_celery(config: Config, name: str = "modelserve", confirm_publish: bool = True) -> Celery:
    """A configured Celery app: durable queues (sync, and a bounded one for async work), late
    acks, time limits, expiring results.

    `confirm_publish` makes every publish wait for the broker's ack (the message is safe on the
    broker): needed before answering 202, not for a request that waits for its own result anyway.
    """
    celery = Celery(name, set_as_current=False)
    celery.conf.update(
        broker_url=config.broker_url,
        result_backend=f"app.celery_app:ResultBackend+{config.result_url}",
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=QUEUE,
        task_queues=[Queue(QUEUE, Exchange(QUEUE, type="direct", durable=True),
                           routing_key=QUEUE, durable=True),
                     # full → the broker nacks the publish (reject-publish): the client's 503
                     Queue(ASYNC_QUEUE, Exchange(ASYNC_QUEUE, type="direct", durable=True),
                           routing_key=ASYNC_QUEUE, durable=True,
                           queue_arguments={"x-max-length": config.async_queue_max,
                                            "x-overflow": "reject-publish"})],
        task_default_exchange=QUEUE,
        task_default_routing_key=QUEUE,
        task_default_delivery_mode="persistent",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_time_limit=120,
        task_soft_time_limit=100,
        result_expires=3600,
        result_extended=False,
        # one message per pool process: a synchronous task never waits behind a prefetched
        # backlog of async ones (the broker hands the next free process either queue's head)
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=2.0,
        broker_heartbeat=10,
        # A 202 means the broker has the task on disk: wait for the publisher confirm.
        broker_transport_options={"confirm_publish": confirm_publish},
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.1,
                                   "interval_step": 0.4, "interval_max": 0.5},
        redis_socket_connect_timeout=2.0,
        redis_socket_timeout=max(5.0, config.predict_timeout + 1),
        redis_retry_on_timeout=False,
        result_backend_transport_options={"retry_policy": {"max_retries": 2,
                                                           "interval_start": 0.1,
                                                           "interval_step": 0.2,
                                                           "interval_max": 0.5}},
    )
    celery.conf.update(tls_settings(config))
    return celery


def tls_settings(config: Config) -> dict:
    """amqps:// and rediss:// (worker instances reaching their front): the server must
    present a certificate of the deploy's CA (MODELSERVE_TLS_CA, nothing else trusted) that
    names the address connected to (unless MODELSERVE_TLS_CHECK_HOSTNAME=0)."""
    out: dict = {}
    if config.broker_url.startswith("amqps:"):
        # server_hostname None: kombu fills in the URL's host, and py-amqp then checks it
        opts = {"ca_certs": config.tls_ca, "cert_reqs": ssl.CERT_REQUIRED,
                "tls_minimum_version": ssl.TLSVersion.TLSv1_2}
        if config.tls_check_hostname:
            opts["server_hostname"] = None
        out["broker_use_ssl"] = opts
    if config.result_url.startswith("rediss:"):
        out["redis_backend_use_ssl"] = {"ssl_ca_certs": config.tls_ca,
                                        "ssl_cert_reqs": ssl.CERT_REQUIRED,
                                        "ssl_check_hostname": config.tls_check_hostname}
    return out
