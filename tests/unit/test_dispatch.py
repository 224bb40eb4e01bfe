"""The micro-batcher: concurrent jobs share one send, each gets its own slice, errors reach all."""

import threading
import time

import pytest

from app.dispatch import Dispatcher, Unavailable


class GatedSend:
    """A fake send that blocks until released and records every batch it was given."""

    def __init__(self):
        self.batches: list[list[list[float]]] = []
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __call__(self, rows, timeout):
        self.batches.append(rows)
        self.entered.set()
        assert self.gate.wait(5)
        return [r[0] * 10 for r in rows], "sha"


def test_jobs_waiting_behind_a_busy_sender_go_out_as_one_batch():
    send = GatedSend()
    d = Dispatcher(send, threads=1, batch_rows=100)
    first = d.submit([[1.0]], timeout=5)
    assert send.entered.wait(2)  # the only sender is now busy with `first`
    later = [d.submit([[float(i)], [float(i) + 0.5]], timeout=5) for i in range(2, 7)]
    send.gate.set()
    assert first.wait() == ([10.0], "sha")
    for i, job in enumerate(later, start=2):
        assert job.wait() == ([i * 10.0, (i + 0.5) * 10.0], "sha")
    assert [len(b) for b in send.batches] == [1, 10]
    d.close()


def test_batches_never_exceed_batch_rows_unless_one_job_is_bigger():
    send = GatedSend()
    d = Dispatcher(send, threads=1, batch_rows=4)
    d.submit([[0.0]], timeout=5)
    assert send.entered.wait(2)
    jobs = [d.submit([[1.0]] * 3, timeout=5), d.submit([[2.0]] * 3, timeout=5),
            d.submit([[3.0]] * 9, timeout=5)]
    send.gate.set()
    for job in jobs:
        job.wait()
    assert [len(b) for b in send.batches] == [1, 3, 3, 9]
    d.close()


def test_a_send_error_reaches_every_job_of_the_batch():
    def send(rows, timeout):
        raise Unavailable("broker down")

    d = Dispatcher(send, threads=2)
    jobs = [d.submit([[1.0]], timeout=2) for _ in range(5)]
    for job in jobs:
        with pytest.raises(Unavailable, match="broker down"):
            job.wait()
    d.close()


def test_wrong_answer_count_is_an_error_not_a_misaligned_result():
    d = Dispatcher(lambda rows, t: ([0.5], "sha"), threads=1)
    with pytest.raises(Unavailable, match="1 answers for 2 rows"):
        d.predict([[1.0], [2.0]], timeout=2)
    d.close()


def test_jobs_past_their_deadline_fail_without_being_sent():
    send = GatedSend()
    d = Dispatcher(send, threads=1)
    d.submit([[1.0]], timeout=5)
    assert send.entered.wait(2)
    stale = d.submit([[2.0]], timeout=0.05)
    time.sleep(0.1)
    send.gate.set()
    with pytest.raises(Unavailable, match="timed out"):
        stale.wait()
    assert len(send.batches) == 1
    d.close()


def test_close_fails_pending_jobs_and_refuses_new_ones():
    send = GatedSend()
    d = Dispatcher(send, threads=1)
    d.submit([[1.0]], timeout=5)
    assert send.entered.wait(2)
    pending = d.submit([[2.0]], timeout=5)
    d.close()
    with pytest.raises(Unavailable, match="stopping"):
        pending.wait()
    with pytest.raises(Unavailable):
        d.submit([[3.0]], timeout=1)
    send.gate.set()
