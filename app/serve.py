"""Web entry point: `python -m app.serve` (waitress on MODELSERVE_HOST:MODELSERVE_PORT)."""

from __future__ import annotations

import collections
import logging
import re
import signal
import sys
import threading
import time

from app.limits import Drain, make_error_task

_ASYNC = re.compile(r"(?:^|&)async=(?:true|1)(?:&|$)", re.IGNORECASE)


def _is_async(channel) -> bool:
    """A waitress task (a channel with parsed requests) for `?async=true` work."""
    return any(_ASYNC.search(getattr(r, "query", "") or "") for r in getattr(channel, "requests", ()))


class Lanes:
    """waitress's task queue (requests waiting for a thread) in two FIFO lanes, read under the
    task dispatcher's lock as its deque was. A free thread takes the oldest synchronous request
    first; async requests are served by at most `bulk_threads` threads at once, the others
    wait in their lane. So an async flood neither delays queued synchronous requests nor
    holds more than a few threads, and the GIL is shared by those few, not by every thread.

    While synchronous requests are in progress (or waiting), async ones are also paced: one at
    a time, each starting only after a pause that keeps the async lane's share of the time at
    most `busy_share` (an async request that took d s is followed by d * (1/share - 1) s with
    no async request starting). A flood of async requests then waits in its lane -- holding
    connections, not CPU -- instead of taking the web process's GIL, the broker and the
    workers from synchronous requests (measured: bench/async_flood.py). With no synchronous
    request in progress the async lane runs unpaced on its threads. `clock` and `timer` are
    for tests."""

    def __init__(self, dispatcher, bulk_threads: int, busy_share: float = 1.0, clock=None,
                 timer=None):
        self._dispatcher, self._cv = dispatcher, dispatcher.queue_cv
        self.bulk_threads, self.bulk_active, self.sync_active = bulk_threads, 0, 0
        self.busy_share = busy_share
        self.sync: collections.deque = collections.deque()
        self.bulk: collections.deque = collections.deque()
        self.not_before = 0.0  # while sync work is in progress, no async start before this
        self._clock = clock or time.monotonic
        self._timer = timer or threading.Timer
        self._wake_at: float | None = None

    def append(self, task) -> None:
        (self.bulk if _is_async(task) else self.sync).append(task)

    def _stopping(self) -> bool:
        """waitress is shutting down (no threads left to serve): every task may be taken,
        so that its shutdown cancels the waiting async requests too."""
        return not getattr(self._dispatcher, "threads", True)

    def _bulk_may_start(self) -> bool:
        if not self.bulk:
            return False
        if self._stopping():
            return True
        if self.bulk_active >= self.bulk_threads:
            return False
        if self.busy_share >= 1.0 or not (self.sync or self.sync_active):
            return True
        if self.bulk_active:
            return False  # paced: one async request at a time while sync work is in progress
        now = self._clock()
        if now >= self.not_before:
            return True
        self._wake(self.not_before, now)
        return False

    def _wake(self, at: float, now: float) -> None:
        """Notify a waiting thread when the pause ends at `at` (synchronous completions notify
        too, but a long synchronous request must not hold the async lane up)."""
        if self._wake_at is not None and self._wake_at <= at:
            return
        self._wake_at = at

        def fire():
            with self._cv:
                if self._wake_at == at:
                    self._wake_at = None
                self._cv.notify()

        t = self._timer(at - now, fire)
        t.daemon = True
        t.start()

    def __len__(self) -> int:
        """Tasks a free thread may take now."""
        return len(self.sync) + (len(self.bulk) if self._bulk_may_start() else 0)

    def popleft(self):
        if self.sync or not self._bulk_may_start():
            self.sync_active += 1
            return _SyncTask(self.sync.popleft(), self)
        self.bulk_active += 1
        return _BulkTask(self.bulk.popleft(), self, self._clock())

    def _sync_done(self) -> None:
        with self._cv:
            self.sync_active -= 1
            self._cv.notify()

    def _bulk_done(self, started: float) -> None:
        with self._cv:
            self.bulk_active -= 1
            if self.busy_share < 1.0:
                now = self._clock()
                self.not_before = max(self.not_before,
                                      now + (now - started) * (1 / self.busy_share - 1))
            self._cv.notify()


class _SyncTask:
    """A synchronous request's task; counts the synchronous work in progress."""

    def __init__(self, task, lanes: Lanes):
        self.task, self.lanes = task, lanes

    def service(self) -> None:
        try:
            self.task.service()
        finally:
            self.lanes._sync_done()

    def cancel(self) -> None:
        # waitress cancels pending tasks while it holds the dispatcher's lock (shutdown)
        self.lanes.sync_active -= 1
        self.task.cancel()

    def __repr__(self) -> str:
        return f"<sync {self.task!r}>"


class _BulkTask:
    """An async request's task; gives its lane's thread slot back when it ends."""

    def __init__(self, task, lanes: Lanes, started: float):
        self.task, self.lanes, self.started = task, lanes, started

    def service(self) -> None:
        try:
            self.task.service()
        finally:
            self.lanes._bulk_done(self.started)

    def cancel(self) -> None:
        # waitress cancels pending tasks while it holds the dispatcher's lock (shutdown)
        self.lanes.bulk_active -= 1
        self.task.cancel()

    def __repr__(self) -> str:
        return f"<async {self.task!r}>"


def make_server(app, config):
    """A waitress server whose limits match the app's: bodies over the app's limit are refused
    from their Content-Length (never buffered), idle or slow clients are cut off, and errors
    waitress answers itself are JSON like the app's."""
    import waitress.server
    from waitress.channel import HTTPChannel

    class Channel(HTTPChannel):
        error_task_class = make_error_task(HTTPChannel.error_task_class)

    server = waitress.server.create_server(
        app, host=config.host, port=config.port, threads=config.web_threads,
        connection_limit=config.connection_limit, channel_timeout=max(1, round(config.client_timeout)),
        cleanup_interval=max(1, min(10, round(config.client_timeout / 3))),
        max_request_body_size=config.max_body_bytes, max_request_header_size=16 * 1024,
        ident="modelserve", clear_untrusted_proxy_headers=True)
    server.channel_class = Channel
    # synchronous requests first; async ones on at most async_inflight threads at once (the
    # others wait in their lane; measured: letting more threads answer 429 at once costs
    # synchronous requests more GIL time than it saves, bench/async_flood.py), and paced to
    # async_busy_share of the time while synchronous requests are in progress
    server.task_dispatcher.queue = Lanes(server.task_dispatcher, config.async_inflight,
                                         config.async_busy_share)
    return server


def main() -> int:
    from app.bundle import BundleError, load_bundle
    from app.config import ConfigError, load_config

    try:
        config = load_config()
        bundle = load_bundle(config.bundle_dir or None, verify=True)
    except (ConfigError, BundleError) as exc:
        print(f"modelserve-web: {exc}", file=sys.stderr)
        return 2
    from app.web import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Dispatcher threads wake on a socket read and need the GIL back at once; the default 5 ms
    # switch interval would add up to that much to every broker round trip under load.
    sys.setswitchinterval(0.0005)
    app = create_app(config, bundle)
    logging.getLogger("modelserve").info(
        "serving release %s (%s, %s) model %s on http://%s:%d", config.release, config.colour,
        config.role, bundle.sha256[:12], config.host, config.port)
    server = make_server(app, config)
    drain = Drain(server, read_timeout=config.client_timeout, grace=config.drain_seconds)
    # SIGTERM (systemd stop, a rollout retiring this instance): stop accepting, finish what
    # is in progress, then exit 0. SIGINT likewise.
    signal.signal(signal.SIGTERM, drain.stop)
    signal.signal(signal.SIGINT, drain.stop)
    drain.serve()
    logging.getLogger("modelserve").info("drained; closing broker connections")
    client = app.extensions["modelserve"]["client"]
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
