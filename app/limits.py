"""Bounds on the work one request may cause: a cheap pre-scan of JSON bodies, a budget of bytes
being parsed at once, and waitress pieces (JSON error pages, slow-request cut-off, SIGTERM drain).

Nothing here imports Flask: the pre-scan runs before `json.loads`, so a body nested 100 000
levels deep or holding a million tiny values is refused after one pass over its bytes with
NumPy, never parsed into Python objects.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from app.dispatch import Unavailable

# A JSON string token (JSON's only use of '"'); the unrolled form keeps `re` linear and fast.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_DELTA = np.zeros(256, dtype=np.int8)
_DELTA[[ord("["), ord("{")]] = 1
_DELTA[[ord("]"), ord("}")]] = -1
log = logging.getLogger("modelserve.limits")


class Overloaded(Unavailable):
    """Too much work in progress right now; the client should retry later (HTTP 503)."""


class AsyncBusy(Unavailable):
    """Every async publish slot is taken (MODELSERVE_ASYNC_INFLIGHT): HTTP 429 at
    once, before the body is parsed."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"{limit} async requests are being accepted already (the limit, "
                         "MODELSERVE_ASYNC_INFLIGHT); retry later")


@dataclass(frozen=True)
class Shape:
    """What the pre-scan saw: the deepest nesting, values in the body, items at depth 2."""

    depth: int
    values: int
    rows: int


def prescan(body: bytes, chunk: int = 1 << 16) -> Shape:
    """Nesting depth, an upper bound on the number of JSON values, and the number of members of
    the containers two levels deep (the rows of {"instances": [...]}), in one linear pass.

    Strings are blanked first so brackets and commas inside them do not count. For a body that
    is not valid JSON the figures are approximate; json.loads still has the last word. Works
    through the body `chunk` bytes at a time, so its scratch memory stays ~7 bytes per chunk
    byte (about 0.5 MiB) whatever the body's size."""
    if b"\\" in body:  # escapes: blank the strings with a regex
        body = _STRING.sub(b'""', body)
    view = memoryview(body)
    level = quotes = deepest = values = rows = 0
    for start in range(0, len(body), chunk):
        raw = np.frombuffer(view[start:start + chunk], dtype=np.uint8)
        # no escapes left: a byte is inside a string iff an odd number of quotes precede it
        q = np.cumsum(raw == ord('"'), dtype=np.int32)
        outside = ((q + quotes) & 1) == 0
        quotes += int(q[-1])
        delta = _DELTA[raw] * outside
        depth = np.cumsum(delta, dtype=np.int32)
        depth += level
        level = int(depth[-1])
        deepest = max(deepest, int(depth.max()))
        commas = (raw == ord(",")) & outside
        opens = delta == 1
        # commas + containers bound the values (each value is followed by a comma or a closer)
        values += int(np.count_nonzero(commas)) + int(np.count_nonzero(opens))
        # members of the containers opened at depth 2: their commas plus one per container
        at2 = depth == 2
        rows += int(np.count_nonzero(commas & at2)) + int(np.count_nonzero(opens & at2))
    return Shape(deepest, values + 1 if body else 0, rows)


class ByteBudget:
    """Bytes of request bodies being read and parsed at once; over budget → Overloaded."""

    def __init__(self, capacity: int, wait: float = 0.25):
        self.capacity, self.wait = capacity, wait
        self._used = 0
        self._cv = threading.Condition()

    @property
    def used(self) -> int:
        return self._used

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        """Reserve `nbytes` (at most the capacity) for the duration of the block."""
        nbytes = max(1, min(int(nbytes), self.capacity))
        deadline = time.monotonic() + self.wait
        with self._cv:
            while self._used + nbytes > self.capacity:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cv.wait(left):
                    if self._used + nbytes > self.capacity:
                        raise Overloaded(f"the server is parsing {self._used} bytes of other "
                                         "requests; retry shortly")
            self._used += nbytes
        try:
            yield
        finally:
            with self._cv:
                self._used -= nbytes
                self._cv.notify_all()


# --- waitress -------------------------------------------------------------------------------

def json_error_body(code: int, reason: str, detail: str, max_body: int) -> bytes:
    """The API's error shape for errors waitress answers itself (before the app runs)."""
    if code == 413:
        err = {"type": "validation_error", "field": "body", "rule": "max_bytes",
               "message": f"request body exceeds {max_body} bytes"}
    else:
        err = {"type": reason.lower().replace(" ", "_"), "field": "request", "rule": "http",
               "message": f"{reason}: {detail}".strip()}
    return json.dumps({"error": err}).encode()


def make_error_task(base):
    """A waitress ErrorTask subclass that answers in JSON, like the app."""

    class JsonErrorTask(base):
        def execute(self):
            e = self.request.error
            body = json_error_body(e.code, e.reason, str(e.body or ""),
                                   self.channel.server.adj.max_request_body_size)
            self.status = f"{e.code} {e.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    return JsonErrorTask


IDLE_CLOSE = 1.0  # seconds a connection must be idle before a drain closes it


def _busy(channel) -> bool:
    return bool(channel.requests or channel.request is not None or channel.total_outbufs_len)


class Drain:
    """Bounded work per connection for a waitress server, and a graceful stop.

    - `maintenance` (waitress calls it every cleanup_interval) also closes a connection whose
      request is still being received `read_timeout` seconds after it was first seen: a
      slowloris client that sends a byte now and then never hits waitress's idle timeout.
    - `serve()` runs the loop until `stop()` (the SIGTERM handler calls it); then it accepts
      what already waits in the listen backlog, closes the listening socket (new connections
      are refused), lets every request in progress finish — bounded by `grace` seconds —
      closes connections idle for IDLE_CLOSE seconds and returns.
    """

    def __init__(self, server, read_timeout: float, grace: float):
        self.server, self.read_timeout, self.grace = server, read_timeout, grace
        self._stopping = False
        self._orig_maintenance = server.maintenance
        server.maintenance = self._maintenance

    def _maintenance(self, now: float) -> None:
        self._orig_maintenance(now)
        for channel in list(self.server.active_channels.values()):
            req = channel.request
            if req is None or channel.requests:
                continue
            first = getattr(req, "_modelserve_seen", None)
            if first is None:
                req._modelserve_seen = now
            elif now - first > self.read_timeout:
                log.warning("closing %s: request not received within %.0fs", channel.addr,
                            self.read_timeout)
                channel.will_close = True

    def stop(self, *_args) -> None:
        """Ask the loop to drain and return (safe in a signal handler)."""
        self._stopping = True
        try:
            self.server.pull_trigger()
        except OSError:
            pass

    def serve(self) -> None:
        srv = self.server
        loop, smap, adj = srv.asyncore.loop, srv._map, srv.adj
        while not self._stopping:
            loop(timeout=adj.asyncore_loop_timeout, map=smap, use_poll=adj.asyncore_use_poll,
                 count=1)
        self._drain()

    def _drain(self) -> None:
        srv = self.server
        srv.accepting = False
        accepted = 0
        while True:  # connections the kernel completed before we stop listening
            try:
                pair = srv.accept()
            except OSError:
                break
            if pair is None:
                break
            conn, addr = pair
            srv.channel_class(srv, conn, srv.fix_addr(addr), srv.adj, map=srv._map)
            accepted += 1
        srv.del_channel()
        srv.socket.close()
        deadline = time.monotonic() + self.grace
        channels = srv.active_channels
        log.info("draining: listener closed, %d connections open (%d from the backlog)",
                 len(channels), accepted)
        while channels and time.monotonic() < deadline:
            now = time.time()  # waitress's clock for last_activity
            for channel in list(channels.values()):
                # idle for a second: a keep-alive connection nobody uses, or one accepted from
                # the backlog whose client never sent a request. A connection just accepted
                # gets that second to send its request: closing it at once would reset it.
                if (not _busy(channel) and not channel.will_close
                        and now - channel.last_activity >= IDLE_CLOSE):
                    channel.will_close = True
            srv.asyncore.loop(timeout=0.05, map=srv._map, use_poll=srv.adj.asyncore_use_poll,
                              count=1)
        if channels:
            log.warning("drain: %d connections still busy after %.0fs; closing them",
                        len(channels), self.grace)
        srv.task_dispatcher.shutdown(timeout=max(1.0, deadline - time.monotonic()))
