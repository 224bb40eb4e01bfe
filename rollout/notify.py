"""Deploy notifications: CloudEvents 1.0 (structured mode) POSTed to ``--notify`` URLs.

Events (``type`` ``io.modelserve.rollout.<event>``): started, gated, switched,
analysis_passed, analysis_failed, rolled_back, failed. ``data`` carries env, release,
from_release, deploy_id, reason and the figures (gate timings, analysis).

A receiver never fails nor slows the deploy: each URL has its own background thread
delivering its events in order; an event may take at most ``BUDGET_S`` (1 s) from the moment
it was emitted, retries (tenacity, a short fixed wait) included; an event whose budget is
spent is dropped with a warning. ``close()`` (at the end of the run) waits at most until the
last event's budget ends, so the run is delayed by at most 1 s in total; threads are daemons.
URLs may carry tokens: only their scheme and host are ever printed.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from urllib.parse import urlsplit

import requests
import tenacity

NOTIFY_ENV = "MODELSERVE_NOTIFY_URL"
BUDGET_S = 1.0
RETRY_WAIT_S = 0.1
CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
TYPE_PREFIX = "io.modelserve.rollout."
EVENTS = ("started", "gated", "switched", "analysis_passed", "analysis_failed", "rolled_back",
          "previewed", "promoted", "aborted", "failed")


def urls_from_env(text: str | None = None) -> list[str]:
    """``MODELSERVE_NOTIFY_URL`` split on commas and whitespace."""
    text = os.environ.get(NOTIFY_ENV, "") if text is None else text
    return [u for u in re.split(r"[\s,]+", text) if u]


def valid_url(text: str) -> bool:
    """An http(s) URL with a host."""
    parts = urlsplit(text)
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def redact_url(url: str) -> str:
    """scheme://host[:port] only (paths and queries of webhooks are secrets)."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.hostname}{f':{p.port}' if p.port else ''}"


def envelope(event: str, env: str, data: dict) -> dict:
    """One CloudEvent (structured mode)."""
    return {"specversion": "1.0", "id": str(uuid.uuid4()), "source": f"modelserve-rollout/{env}",
            "type": TYPE_PREFIX + event,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "datacontenttype": "application/json", "subject": str(data.get("release") or ""),
            "data": data}


class _Sender(threading.Thread):
    """Delivers one URL's events in order, each within its own budget."""

    def __init__(self, url: str, warn: Callable[[str], None]):
        super().__init__(name=f"notify-{redact_url(url)}", daemon=True)
        self.url, self.warn = url, warn
        self.q: queue.Queue = queue.Queue()
        self.start()

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            deadline, body = item
            try:
                self._deliver(deadline, body)
            except Exception as err:  # noqa: BLE001 - a receiver never fails the deploy
                self.warn(f"notification {body['type'].rsplit('.', 1)[-1]} to "
                          f"{redact_url(self.url)} not delivered: {type(err).__name__}")

    def _deliver(self, deadline: float, body: dict) -> None:
        data = json.dumps(body).encode()

        def post() -> None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("budget spent")
            r = requests.post(self.url, data=data, timeout=(left, left),
                              headers={"Content-Type": CONTENT_TYPE})
            if r.status_code >= 300:
                raise requests.HTTPError(f"HTTP {r.status_code}")

        tenacity.Retrying(
            stop=tenacity.stop_before_delay(max(0.0, deadline - time.monotonic()))
            | tenacity.stop_after_attempt(5),
            wait=tenacity.wait_fixed(RETRY_WAIT_S),
            retry=tenacity.retry_if_exception_type((requests.RequestException,)),
            reraise=True)(post)


class Notifier:
    """POSTs CloudEvents to ``urls`` without ever failing or slowing the run by > 1 s."""

    def __init__(self, urls: Sequence[str], env: str,
                 warn: Callable[[str], None] | None = None):
        self.env = env
        self.sent: list[dict] = []  # every event emitted (for --json and tests)
        self._warn = warn or (lambda text: None)
        self._senders = [_Sender(u, self._warn) for u in dict.fromkeys(urls)]
        self._last_deadline = 0.0

    def emit(self, event: str, data: dict) -> dict:
        """Queue ``event`` for every URL; returns the envelope."""
        assert event in EVENTS, event
        body = envelope(event, self.env, data)
        self.sent.append(body)
        deadline = time.monotonic() + BUDGET_S
        self._last_deadline = deadline
        for s in self._senders:
            s.q.put((deadline, body))
        return body

    def close(self) -> None:
        """Wait for pending deliveries, at most until the last event's budget is spent."""
        for s in self._senders:
            s.q.put(None)
        for s in self._senders:
            s.join(timeout=max(0.0, self._last_deadline - time.monotonic()) + 0.05)
        self._senders = []
