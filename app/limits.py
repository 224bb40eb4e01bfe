"""Bounds on the work one request may cause: a cheap pre-scan of JSON bodies, a budget of bytes
being parsed at once, and waitress pieces (JSON error pages, slow-request cut-off, SIGTERM drain).

Nothing here imports Flask: the pre-scan runs before `json.loads`, so a body nested 100 000
levels deep or holding a million tiny values is refused after one pass over its bytes with
NumPy, never parsed into Python objects.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from app.dispatch import Unavailable

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

    Brackets and commas inside strings do not count: a '"' delimits a string unless an odd run
    of backslashes precedes it (an escaped quote), and a byte is inside a string iff an odd
    number of delimiting quotes precede it. No regex, nothing that backtracks: a fixed number
    of NumPy passes over the bytes, whatever they are. For a body that is not valid JSON the
    figures are approximate; json.loads still has the last word. Works through the body
    `chunk` bytes at a time, carrying the backslash-run parity, quote parity and depth from one
    chunk to the next, so its scratch memory stays ~7 bytes per chunk byte (about 0.5 MiB)
    whatever the body's size."""
    view = memoryview(body)
    state = _ScanState()
    for start in range(0, len(body), chunk):
        _scan_chunk(np.frombuffer(view[start:start + chunk], dtype=np.uint8), state)
    return Shape(state.deepest, state.values + 1 if body else 0, state.rows)


@dataclass
class _ScanState:
    """What prescan carries from one chunk to the next."""

    odd_run: int = 0  # 1 if the bytes so far end in an odd run of backslashes
    quotes: int = 0  # delimiting quotes so far
    level: int = 0  # nesting depth at the end of the bytes so far
    deepest: int = 0
    values: int = 0
    rows: int = 0


def _scan_chunk(raw: np.ndarray, st: _ScanState) -> None:
    """One chunk of prescan. Its arrays are one byte per chunk byte, or four for the one int32
    buffer, filled in place (NumPy's casting cumsum would copy): ~7 bytes per byte at most."""
    is_quote = raw == ord('"')
    is_bs = raw == ord("\\")
    if st.odd_run or is_bs.any():  # some quote may be escaped
        # run[i]: the parity of the run of backslashes ending at byte i (0 if i is not one),
        # i.e. of i - (the index of the last non-backslash at or before i); -1 - odd_run stands
        # for the last one before the chunk
        run = np.arange(len(raw), dtype=np.int32)
        run[is_bs] = -1 - st.odd_run
        del is_bs
        np.maximum.accumulate(run, out=run)
        run &= 1  # parity(i - j) == parity(i) ^ parity(j), in two's complement too
        run[1::2] ^= 1
        # a quote after an odd run of backslashes is escaped: not a delimiter
        np.logical_and(is_quote[1:], run[:-1] == 0, out=is_quote[1:])
        is_quote[0] &= not st.odd_run
        st.odd_run = int(run[-1])
        del run
    else:
        del is_bs
    # a byte is inside a string iff an odd number of delimiting quotes precede it
    acc = is_quote.astype(np.int32)
    del is_quote
    np.add.accumulate(acc, out=acc)
    quotes = st.quotes
    st.quotes += int(acc[-1])
    acc += quotes & 1
    acc &= 1
    outside = acc == 0
    delta = _DELTA[raw]
    delta *= outside
    commas = raw == ord(",")
    commas &= outside
    del outside
    depth = acc
    depth[...] = delta
    np.add.accumulate(depth, out=depth)
    depth += st.level
    st.level = int(depth[-1])
    st.deepest = max(st.deepest, int(depth.max()))
    opens = delta == 1
    del delta
    # commas + containers bound the values (each value is followed by a comma or a closer)
    st.values += int(np.count_nonzero(commas)) + int(np.count_nonzero(opens))
    # members of the containers opened at depth 2: their commas plus one per container
    at2 = depth == 2
    commas &= at2
    opens &= at2
    st.rows += int(np.count_nonzero(commas)) + int(np.count_nonzero(opens))


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
