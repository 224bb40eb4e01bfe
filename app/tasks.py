"""Celery tasks. TensorFlow is imported only inside worker processes, after fork."""

from __future__ import annotations

from celery import shared_task
from celery.signals import worker_process_init

from app.bundle import load_bundle
from app.celery_app import ASYNC_QUEUE, PREDICT_TASK

_bundle_dir: str = ""


def configure(bundle_dir: str) -> None:
    """Set the bundle the worker processes load (called by app.worker before forking)."""
    global _bundle_dir
    _bundle_dir = bundle_dir


def _runtime():
    from app.runtime import get_runtime

    # the bundle is read and verified once, when the process first needs the model
    return get_runtime(lambda: load_bundle(_bundle_dir or None, verify=True))


@worker_process_init.connect
def _load_model_after_fork(**_kwargs) -> None:
    # prefork children load here; other pools (MODELSERVE_WORKER_POOL=threads) on first use
    _runtime()



@shared_task(name=PREDICT_TASK, acks_late=True, reject_on_worker_lost=True, bind=True)
def predict(self, rows: dict | list[list[float]]) -> dict:
    """Score a batch of rows in feature order (packed by app.codec, or plain lists) →
    {"probabilities": packed float32, "sha256": the model's}."""
    from app.codec import pack, unpack

    if (self.request.delivery_info or {}).get("routing_key") == ASYNC_QUEUE:
        # an async task is STARTED from now on: its expiry no longer applies (app.client)
        self.update_state(state="STARTED")
    runtime = _runtime()
    x = unpack(rows) if isinstance(rows, dict) else rows
    return {"probabilities": pack(runtime.predict_array(x)), "sha256": runtime.sha256}
