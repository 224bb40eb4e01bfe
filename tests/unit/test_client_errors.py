"""How BrokerClient maps what Celery raises on the synchronous path to HTTP outcomes.

Pure mapping logic: a stand-in for the Celery app returns a result whose get() raises what a
real one raised under a broker restart (tests/integration/test_faults.py drives the real case).
"""

import pytest
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.exceptions import OperationalError

from app.client import BrokerClient
from app.dispatch import Unavailable


class _Result:
    def __init__(self, exc):
        self.exc = exc
        self.forgotten = False

    def get(self, **_):
        raise self.exc

    def forget(self):
        self.forgotten = True


class _Celery:
    def __init__(self, exc):
        self.result = _Result(exc)

    def send_task(self, *_, **__):
        return self.result


def _client(exc) -> BrokerClient:
    client = object.__new__(BrokerClient)  # no broker: only the mapping is under test
    client.celery_sync = _Celery(exc)
    return client


@pytest.mark.parametrize("exc, message", [
    (TaskRevokedError("expired"), "no worker started the task within 3.0s"),
    (CeleryTimeout("timeout"), "no worker answered within 3.0s"),
    (OperationalError("connection reset"), "broker or result store unreachable"),
    (ConnectionResetError("reset"), "broker or result store unreachable"),
])
def test_sync_path_maps_expiry_timeouts_and_transport_errors_to_unavailable(exc, message):
    client = _client(exc)
    with pytest.raises(Unavailable, match=message):
        client._send_and_wait([[1.0] * 7], 3.0)
    assert client.celery_sync.result.forgotten  # the result is released whatever happened


def test_a_worker_side_error_is_not_disguised_as_unavailable():
    client = _client(ValueError("the model rejected the batch"))
    with pytest.raises(ValueError):
        client._send_and_wait([[1.0] * 7], 3.0)
