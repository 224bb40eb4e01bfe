"""The protocol's value types: state encoding round-trips and stays short enough for Neutron."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rollout.clouds.base import (
    Deployment,
    FipState,
    FloatingIP,
    HistoryEvent,
    Instance,
    Lock,
    Release,
    by_newest,
)

ids = st.from_regex(r"[a-z0-9][a-z0-9.\-]{0,30}", fullmatch=True)


@given(live=ids, previous=ids, holder=ids, deploy=ids, leased=st.booleans())
def test_fip_state_round_trips_and_fits_a_description(live, previous, holder, deploy, leased):
    state = FipState(live=live, previous=previous,
                     lock=Lock(f"{holder}@host-{holder}:123", "2026-11-26T06:00:00Z", deploy,
                               "2026-11-26T06:15:00Z" if leased else ""))
    text = state.encode()
    assert FipState.decode(text) == state
    assert len(text) < 255
    assert state.lock.host == f"host-{holder}" and state.lock.pid == 123


def test_a_lock_written_before_leases_still_decodes():
    lk = FipState.decode('{"k":"u@h:7|2026-11-26T06:00:00Z|d1"}').lock
    assert lk == Lock("u@h:7", "2026-11-26T06:00:00Z", "d1", "")
    assert lk.host == "h" and lk.pid == 7
    assert Lock("garbage", "", "").pid is None


def test_fip_state_decodes_garbage_to_empty():
    for text in (None, "", "not json", "[1]", "{}"):
        assert FipState.decode(text) == FipState()


def test_history_event_round_trips():
    ev = HistoryEvent("2026-11-26T06:00:00Z", "rollback", "r2", "r1", "d1")
    assert HistoryEvent.decode(ev.encode()) == ev


def test_deployment_derives_live_from_the_real_target():
    a = Instance("a", "a", "dev", "r1", "blue", "front", "d1", "RUNNING", "10.0.0.2", "10.0.0.2")
    b = Instance("b", "b", "dev", "r2", "green", "front", "d2", "RUNNING", "10.0.0.3", "10.0.0.3")
    fip = FloatingIP("f", "10.9.0.1", "dev", "10.0.0.3", "1", FipState(live="r1", previous="r1"))
    dep = Deployment("dev", fip, (), (a, b))
    assert dep.live == "r2" and dep.live_instance == b and dep.previous == "r1"
    assert Deployment("dev", None, (), (a, b)).live is None


def test_by_newest():
    r = [Release("1", "m-a", "a", "s", built_at="2026-01-01"),
         Release("2", "m-b", "b", "s", built_at="2026-02-01")]
    assert [x.release for x in by_newest(r)] == ["b", "a"]
