"""Web entry point: `python -m app.serve` (waitress on MODELSERVE_HOST:MODELSERVE_PORT)."""

from __future__ import annotations

import collections
import logging
import re
import signal
import sys

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
    holds more than a few threads, and the GIL is shared by those few, not by every thread."""

    def __init__(self, dispatcher, bulk_threads: int):
        self._cv = dispatcher.queue_cv
        self.bulk_threads, self.bulk_active = bulk_threads, 0
        self.sync: collections.deque = collections.deque()
        self.bulk: collections.deque = collections.deque()

    def append(self, task) -> None:
        (self.bulk if _is_async(task) else self.sync).append(task)

    def __len__(self) -> int:
        """Tasks a free thread may take now."""
        return len(self.sync) + (len(self.bulk) if self.bulk_active < self.bulk_threads else 0)

    def popleft(self):
        if self.sync or self.bulk_active >= self.bulk_threads:
            return self.sync.popleft()
        self.bulk_active += 1
        return _BulkTask(self.bulk.popleft(), self)

    def _done(self) -> None:
        with self._cv:
            self.bulk_active -= 1
            self._cv.notify()


class _BulkTask:
    """An async request's task; gives its lane's thread slot back when it ends."""

    def __init__(self, task, lanes: Lanes):
        self.task, self.lanes = task, lanes

    def service(self) -> None:
        try:
            self.task.service()
        finally:
            self.lanes._done()

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
    # synchronous requests more GIL time than it saves, bench/async_flood.py)
    server.task_dispatcher.queue = Lanes(server.task_dispatcher, config.async_inflight)
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
