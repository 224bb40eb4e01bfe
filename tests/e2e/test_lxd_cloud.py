"""The LXD provider's own guarantees on real LXD (in the test project): the compare-and-swap
mutex, race-free floating-IP creation (I11), pinned instance addresses (I2)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from rollout.clouds.base import InstanceSpec, Release
from rollout.clouds.lxd import CAS_STALE_S, LXDCloud
from rollout.errors import Conflict, TransientCloudError
from tests.e2e.lxdenv import PY, ROOT, destroy_env, new_env_name, project

pytestmark = pytest.mark.e2e


@pytest.fixture
def env(cloud):
    name = new_env_name("cas")
    yield name
    destroy_env(cloud, name)


def _desc(cloud, env: str) -> str | None:
    """The mutex profile's description, None when it does not exist (free)."""
    name = cloud._mutex_name(env)  # noqa: SLF001
    names = [u.rsplit("/", 1)[-1].split("?")[0] for u in cloud.client.api.profiles.get().json()["metadata"]]
    if name not in names:
        return None
    return cloud.client.api.profiles[name].get().json()["metadata"]["description"]


def _make_stale(cloud, env: str) -> None:
    name = cloud._mutex_name(env)  # noqa: SLF001
    old = f"held|deadbeef|{time.time() - CAS_STALE_S - 5:.3f}|1"
    try:
        cloud.client.api.profiles.post(json={"name": name, "description": old})
    except Exception:  # noqa: BLE001 - exists: overwrite
        cloud.client.api.profiles[name].put(json={"description": old, "config": {},
                                                  "devices": {}})


def test_stale_mutex_is_taken_over_by_exactly_one_of_many(cloud, env):
    _make_stale(cloud, env)
    clouds = [LXDCloud(project=project()) for _ in range(6)]
    barrier = threading.Barrier(len(clouds))
    won, busy = [], []

    def contend(c: LXDCloud, i: int) -> None:
        barrier.wait()
        try:
            c._mutex_acquire(c._mutex_name(env), f"tok{i}x", env)  # noqa: SLF001
            won.append(i)
        except TransientCloudError:
            busy.append(i)

    threads = [threading.Thread(target=contend, args=(c, i)) for i, c in enumerate(clouds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(won) == 1 and len(busy) == len(clouds) - 1, (won, busy)
    assert f"tok{won[0]}x" in _desc(cloud, env)


def test_release_frees_only_its_own_mutex(cloud, env):
    holder = LXDCloud(project=project())
    with holder._cas_mutex(env):  # noqa: SLF001
        _make_stale(cloud, env)  # the holder took too long: judged stale ...
        cloud._mutex_acquire(cloud._mutex_name(env), "breaker", env)  # noqa: SLF001
    # ... the original holder's exit must not free the breaker's mutex
    assert "breaker" in _desc(cloud, env)
    cloud._mutex_release(cloud._mutex_name(env), "breaker")  # noqa: SLF001
    assert _desc(cloud, env) is None


HOLD_SCRIPT = """
import json, os, sys, time
from rollout.clouds.lxd import LXDCloud
from rollout.errors import TransientCloudError
env, marker, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
cloud = LXDCloud()
held = clash = 0
deadline = time.monotonic() + 240
while held < rounds and time.monotonic() < deadline:
    try:
        with cloud._cas_mutex(env):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                clash += 1
                continue
            time.sleep(0.02)
            os.close(fd)
            os.unlink(marker)
            held += 1
    except TransientCloudError:
        time.sleep(0.01)
print(json.dumps({"held": held, "clash": clash}))
"""


def test_two_processes_never_both_hold_the_mutex(cloud, env, tmp_path):
    marker = tmp_path / "inside"
    procs = [subprocess.Popen([PY, "-c", HOLD_SCRIPT, env, str(marker), "15"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out))
    assert all(o["clash"] == 0 for o in outs), outs
    assert all(o["held"] == 15 for o in outs), outs
    assert _desc(cloud, env) is None


def _create_until_decided(c: LXDCloud, env: str):
    deadline = time.monotonic() + 120
    while True:
        try:
            return c.create_floating_ip(env)
        except Conflict as exc:
            return exc
        except TransientCloudError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _env_forwards(cloud, env: str) -> list[dict]:
    return cloud._env_forwards(env)  # noqa: SLF001


def test_racing_floating_ip_creation_in_threads_leaves_one(cloud, env):
    clouds = [LXDCloud(project=project()) for _ in range(6)]
    barrier = threading.Barrier(len(clouds))
    results: list = []

    def create(c: LXDCloud) -> None:
        barrier.wait()
        results.append(_create_until_decided(c, env))

    threads = [threading.Thread(target=create, args=(c,)) for c in clouds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    won = [r for r in results if not isinstance(r, Exception)]
    lost = [r for r in results if isinstance(r, Conflict)]
    assert len(won) == 1 and len(lost) == len(clouds) - 1, results
    assert [f["listen_address"] for f in _env_forwards(cloud, env)] == [won[0].address]


CREATE_SCRIPT = """
import os, sys, time
from rollout.clouds.lxd import LXDCloud
from rollout.errors import Conflict, TransientCloudError
env, gate, parties = sys.argv[1], sys.argv[2], int(sys.argv[3])
cloud = LXDCloud()
open(os.path.join(gate, str(os.getpid())), "w").close()  # imported, ready to race
deadline = time.monotonic() + 120
while len(os.listdir(gate)) < parties:  # start together, once every process is ready
    if time.monotonic() > deadline:
        sys.exit(f"only {len(os.listdir(gate))} of {parties} processes got ready in 120 s")
    time.sleep(0.002)
while True:
    try:
        print("won", cloud.create_floating_ip(env).address)
        break
    except Conflict:
        print("conflict")
        break
    except TransientCloudError:
        time.sleep(0.02)
"""


def test_racing_floating_ip_creation_in_two_processes_leaves_one(cloud, env, tmp_path):
    gate = tmp_path / "gate"  # each process marks itself ready here, then waits for the other
    gate.mkdir()
    procs = [subprocess.Popen([PY, "-c", CREATE_SCRIPT, env, str(gate), "2"], cwd=ROOT,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        outs.append(out.strip())
    assert sorted(o.split()[0] for o in outs) == ["conflict", "won"], outs
    assert len(_env_forwards(cloud, env)) == 1


def test_the_same_pinned_address_is_never_running_twice(cloud, env, monkeypatch):
    """Two creates that picked the same address: LXD refuses the second NIC, the loser
    retries with another; both end RUNNING on distinct pinned addresses."""
    base = json.loads(subprocess.run(["lxc", "image", "list", "modelserve-base-debian12",
                                      "--format", "json"], capture_output=True, text=True,
                                     check=True).stdout)[0]["fingerprint"]
    release = Release(id=base, name="modelserve-base-debian12", release="base",
                      model_sha256="")
    same = cloud.pick_address()
    real_pick = LXDCloud.pick_address
    first: dict[int, bool] = {}

    def pick(self, avoid=frozenset()):
        me = threading.get_ident()
        if not first.get(me):
            first[me] = True
            return same
        return real_pick(self, avoid)

    monkeypatch.setattr(LXDCloud, "pick_address", pick)
    clouds = [LXDCloud(project=project()) for _ in range(2)]
    barrier = threading.Barrier(2)
    made, errors = [], []

    def create(c: LXDCloud, i: int) -> None:
        labels = {"env": env, "release": "base", "colour": "blue", "role": "front",
                  "deploy_id": f"d{i}", "created_at": "2026-01-01T00:00:00Z"}
        barrier.wait()
        try:
            made.append(c.create_instance(InstanceSpec(f"ms-{env}-pin{i}", release, labels,
                                                       "#cloud-config\n{}\n")))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(c, i)) for i, c in enumerate(clouds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    pinned = [cloud._target_address(i.name) for i in made]  # noqa: SLF001
    assert len(set(pinned)) == 2, pinned


def _base_release() -> Release:
    base = json.loads(subprocess.run(["lxc", "image", "list", "modelserve-base-debian12",
                                      "--format", "json"], capture_output=True, text=True,
                                     check=True).stdout)[0]["fingerprint"]
    return Release(id=base, name="modelserve-base-debian12", release="base", model_sha256="")


def _root_pool(cloud: LXDCloud, name: str) -> str:
    inst = cloud.client.api.instances[name].get().json()["metadata"]
    return inst["expanded_devices"]["root"]["pool"]


def test_instances_go_on_the_copy_on_write_pool_else_the_profiles(cloud, env, monkeypatch):
    """up.sh makes a btrfs pool where the machine allows it (it does here: the suite's
    set-up ran up.sh): launches clone there; a machine without it falls back to the profile's
    pool (an absent pool name stands in for such a machine)."""
    pools = [u.rsplit("/", 1)[-1] for u in
             cloud.client.api.storage_pools.get().json()["metadata"]]
    assert "modelserve-cow" in pools, f"up.sh made no copy-on-write pool here: {pools}"
    labels = {"env": env, "release": "base", "colour": "blue", "role": "front",
              "deploy_id": "d1", "created_at": "2026-01-01T00:00:00Z"}
    cow = LXDCloud(project=project())
    made = cow.create_instance(InstanceSpec(f"ms-{env}-cow", _base_release(), labels,
                                            "#cloud-config\n{}\n"))
    assert cow.pool == "modelserve-cow"
    assert _root_pool(cow, made.name) == "modelserve-cow"

    monkeypatch.setenv("MODELSERVE_LXD_COW_POOL", f"absent-{env}")
    plain = LXDCloud(project=project())
    made = plain.create_instance(InstanceSpec(f"ms-{env}-dir", _base_release(),
                                              {**labels, "deploy_id": "d2"},
                                              "#cloud-config\n{}\n"))
    assert plain.pool is None
    profile = cloud.client.api.profiles["default"].get().json()["metadata"]
    assert _root_pool(plain, made.name) == profile["devices"]["root"]["pool"] != "modelserve-cow"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
