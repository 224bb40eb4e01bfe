"""Web entry point: `python -m app.serve` (waitress on MODELSERVE_HOST:MODELSERVE_PORT)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
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


def make_server(app, config, sock: socket.socket | None = None):
    """A waitress server whose limits match the app's: bodies over the app's limit are refused
    from their Content-Length (never buffered), idle or slow clients are cut off, and errors
    waitress answers itself are JSON like the app's. On `sock` (bound, not yet listening) if
    given, else on config.host:config.port."""
    import waitress.server
    from waitress.channel import HTTPChannel

    class Channel(HTTPChannel):
        error_task_class = make_error_task(HTTPChannel.error_task_class)

    where = {"sockets": [sock]} if sock is not None else {"host": config.host, "port": config.port}
    server = waitress.server.create_server(
        app, **where, threads=config.web_threads,
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if config.web_processes > 1:
        return serve_processes(config, bundle)
    return serve(config, bundle)


def serve(config, bundle, sock: socket.socket | None = None, on_stop=None,
          started=None) -> int:
    """Serve until SIGTERM/SIGINT, then drain and return 0. `on_stop` runs first on such a
    signal; `started(drain)` once the server listens (serve_processes stops it from there)."""
    from app.web import create_app

    # Dispatcher threads wake on a socket read and need the GIL back at once; the default 5 ms
    # switch interval would add up to that much to every broker round trip under load.
    sys.setswitchinterval(0.0005)
    app = create_app(config, bundle)
    logging.getLogger("modelserve").info(
        "serving release %s (%s, %s) model %s on http://%s:%d", config.release, config.colour,
        config.role, bundle.sha256[:12], config.host, config.port)
    server = make_server(app, config, sock)
    drain = Drain(server, read_timeout=config.client_timeout, grace=config.drain_seconds)

    # SIGTERM (systemd stop, a rollout retiring this instance): stop accepting, finish what
    # is in progress, then exit 0. SIGINT likewise.
    def stop(*_args) -> None:
        if on_stop is not None:
            on_stop()
        drain.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if started is not None:
        started(drain)
    drain.serve()
    logging.getLogger("modelserve").info("drained; closing broker connections")
    client = app.extensions["modelserve"]["client"]
    client.close()
    return 0


def per_process(config):
    """One web process's config when config.web_processes share the front.
    MODELSERVE_DISPATCH_THREADS is the front's micro-batches in flight, shared out (at least
    one each): about one per worker process in all. Two processes with 2 each split the same
    rows into twice the tasks and served 0.8x at c=16; with 1 each, 1.26x (docs/performance.md)."""
    return dataclasses.replace(
        config, dispatch_threads=max(1, config.dispatch_threads // config.web_processes))


def _listener(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT: the kernel spreads new connections over
    every listening socket of this user bound so, i.e. over the front's web processes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def serve_processes(config, bundle) -> int:
    """config.web_processes copies of the server on one port, this process one of them and the
    parent of the others. One process's GIL caps a front near 700 req/s on 2 cores
    (docs/performance.md); the broker, the worker and the result store are shared.

    - Every socket is bound here before any fork, so a port in use fails once, at start; each
      process then listens on its own (SO_REUSEPORT), and a process that stops listening
      takes no new connections while the others go on.
    - Each process builds its own app after the fork (broker and Redis connections, threads).
    - Metrics: PROMETHEUS_MULTIPROC_DIR, a fresh private dir, is set before any process
      imports prometheus_client; `/metrics` sums every process's values (app.metrics).
    - SIGTERM/SIGINT: forwarded to the others (the unit's KillMode=mixed signals this process
      only), every process drains as one alone would, and this one returns 0 once all have.
    - A process that dies otherwise stops the rest (drained) and this returns 1, so the unit's
      Restart=on-failure starts the front again whole rather than at half its size."""
    log = logging.getLogger("modelserve")
    config = per_process(config)
    try:
        socks = [_listener(config.host, config.port) for _ in range(config.web_processes)]
    except OSError as exc:
        print(f"modelserve-web: cannot listen on {config.host}:{config.port}: {exc.strerror}",
              file=sys.stderr)
        return 2
    metrics_dir = tempfile.mkdtemp(prefix="modelserve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    children: set[int] = set()
    state = {"stopping": False, "failed": False, "drain": None}

    def forward(*_args) -> None:
        state["stopping"] = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    # a stop before this process serves: forwarded, and its drain starts at once (started)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for i in range(1, len(socks)):
        pid = os.fork()
        if pid == 0:  # a child: its own socket only, its own signal handlers (serve)
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                for j, other in enumerate(socks):
                    if j != i:
                        other.close()
                code = serve(config, bundle, socks[i])
            except BaseException:  # noqa: BLE001 - the parent sees the exit status
                log.exception("web process %d failed", os.getpid())
            finally:
                os._exit(code)
        children.add(pid)
    for other in socks[1:]:
        other.close()

    def on_child(*_args) -> None:
        if state["stopping"]:
            return  # the wait below reaps them
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in children:
                children.discard(pid)
                log.error("web process %d exited (%s): stopping the front", pid,
                          _wait_text(status))
                state["failed"] = True
        if state["failed"]:
            forward()
            if state["drain"] is not None:
                state["drain"].stop()

    def started(drain) -> None:
        state["drain"] = drain
        if state["stopping"]:  # stopped, or a child died, before this one served
            drain.stop()

    signal.signal(signal.SIGCHLD, on_child)
    try:
        serve(config, bundle, socks[0], on_stop=forward, started=started)
    finally:
        forward()
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                _, status = os.waitpid(pid, 0)
                # SIGTERM before a child's own handler was set: stopped, as asked
                if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM) and (
                        not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0):
                    log.error("web process %d exited (%s)", pid, _wait_text(status))
                    state["failed"] = True
            children.discard(pid)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 1 if state["failed"] else 0


def _wait_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"status {os.WEXITSTATUS(status)}"


if __name__ == "__main__":
    sys.exit(main())
