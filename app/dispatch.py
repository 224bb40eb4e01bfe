"""Micro-batching: concurrent requests share one Celery task.

Request threads submit rows and wait on a Job. A fixed pool of dispatcher threads takes every
pending job (up to `batch_rows` rows) as one batch, sends it as one task and hands each job its
slice of the answer. With N requests in flight the broker round trip is paid about N/threads
times less often, which is what keeps the broker path close to the in-process floor. Only
these fixed threads wait on results, so Celery's per-thread result consumers never churn.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class Unavailable(Exception):
    """The broker, the result store or the workers could not answer in time (HTTP 503)."""


@dataclass
class Job:
    """One request's rows and, once done, its probabilities or error."""

    rows: list[list[float]]
    deadline: float
    probabilities: list[float] | None = None
    sha256: str = ""
    error: Exception | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait(self) -> tuple[list[float], str]:
        """Block until the batch holding this job is answered or the deadline passes."""
        if not self._done.wait(max(0.0, self.deadline - time.monotonic()) + 0.5):
            raise Unavailable("no answer from the workers before the deadline")
        if self.error is not None:
            raise self.error
        assert self.probabilities is not None
        return self.probabilities, self.sha256


# send(rows, timeout) -> (probabilities, sha256); raises Unavailable (or anything: it is relayed)
SendFn = Callable[[list[list[float]], float], tuple[list[float], str]]
ObserveFn = Callable[[int, float], None]


class Dispatcher:
    """Batches submitted jobs over a fixed pool of sender threads."""

    def __init__(self, send: SendFn, threads: int = 4, batch_rows: int = 512,
                 observe: ObserveFn | None = None):
        self._send = send
        self._batch_rows = batch_rows
        self._observe = observe or (lambda rows, seconds: None)
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, name=f"dispatch-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, rows: list[list[float]], timeout: float) -> Job:
        """Queue rows for the next batch; the returned job's wait() gives the answer."""
        job = Job(rows=rows, deadline=time.monotonic() + timeout)
        with self._cv:
            if self._closed:
                raise Unavailable("the dispatcher is shut down")
            self._pending.append(job)
            self._cv.notify()
        return job

    def predict(self, rows: list[list[float]], timeout: float) -> tuple[list[float], str]:
        """Submit and wait: probabilities and the sha256 of the model that computed them."""
        return self.submit(rows, timeout).wait()

    def close(self) -> None:
        """Stop the sender threads; pending jobs fail with Unavailable."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            while self._pending:
                self._fail([self._pending.popleft()], Unavailable("the web process is stopping"))

    def _take(self) -> list[Job] | None:
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            batch = [self._pending.popleft()]
            rows = len(batch[0].rows)
            while self._pending and rows + len(self._pending[0].rows) <= self._batch_rows:
                job = self._pending.popleft()
                rows += len(job.rows)
                batch.append(job)
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            now = time.monotonic()
            live = [j for j in batch if j.deadline > now]
            self._fail([j for j in batch if j.deadline <= now],
                       Unavailable("timed out waiting for a free dispatcher"))
            if live:
                self._run(live)

    def _run(self, batch: list[Job]) -> None:
        rows = [r for job in batch for r in job.rows]
        timeout = max(0.05, min(j.deadline for j in batch) - time.monotonic())
        started = time.perf_counter()
        try:
            probabilities, sha256 = self._send(rows, timeout)
            if len(probabilities) != len(rows):
                raise Unavailable(f"worker returned {len(probabilities)} answers for {len(rows)} rows")
        except Exception as exc:  # relayed to every waiting request
            self._fail(batch, exc)
            return
        self._observe(len(rows), time.perf_counter() - started)
        start = 0
        for job in batch:
            job.probabilities = probabilities[start:start + len(job.rows)]
            job.sha256 = sha256
            start += len(job.rows)
            job._done.set()

    @staticmethod
    def _fail(jobs: list[Job], exc: Exception) -> None:
        for job in jobs:
            job.error = exc
            job._done.set()
