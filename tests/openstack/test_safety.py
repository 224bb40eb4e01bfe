"""The safety invariants (rollout/README.md) through the real control plane: the cases a user
observed breaking them, each in an environment of its own.

Mid-deploy moments are reached through the tool's own hook (MODELSERVE_ROLLOUT_PAUSE_BEFORE +
MODELSERVE_ROLLOUT_HOOK_DIR): the run says when it got there, the test acts, nothing is timed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from rollout.cli import ExitCode
from rollout.clouds.base import FipState
from tests.openstack.osenv import (
    PY,
    ROOT,
    fip_of,
    live_release,
    live_servers,
    ok,
    port_of,
    rollout,
)

pytestmark = pytest.mark.openstack


def _wait_gone(conn, env_name, keep_ids, timeout=120):
    deadline = time.monotonic() + timeout
    while {s.id for s in live_servers(conn, env_name)} != set(keep_ids):
        assert time.monotonic() < deadline, (
            f"left in {env_name}: {[s.name for s in live_servers(conn, env_name)]}")
        time.sleep(0.5)


def _lock(conn, env_name):
    return FipState.decode(fip_of(conn, env_name).description).lock


def _start_paused(os_env, env_name, release, hook_dir: Path, step: str) -> subprocess.Popen:
    """A deploy that stops before ``step`` (after creating ``<step>.reached``)."""
    env = dict(os_env, MODELSERVE_ROLLOUT_PAUSE_BEFORE=step,
               MODELSERVE_ROLLOUT_HOOK_DIR=str(hook_dir))
    return subprocess.Popen(
        [PY, "-m", "rollout", "deploy", "--cloud", "openstack", "--env", env_name,
         "--release", release, "--no-probe"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        # the way CI shells start background jobs: SIGINT ignored on entry
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


def _wait_reached(proc: subprocess.Popen, hook_dir: Path, step: str, timeout=300) -> None:
    marker = hook_dir / f"{step}.reached"
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the deploy ended (rc={proc.returncode}) before {step}: {err[-2000:]}")
        assert time.monotonic() < deadline, f"the deploy never reached {step}"
        time.sleep(0.05)


@pytest.fixture
def live_a(os_env, conn, releases, env_name):
    """A fresh env with release A live; (env, A's server id)."""
    ok(rollout(os_env, "deploy", "--release", releases[0], "--no-probe", env_name=env_name))
    (server,) = live_servers(conn, env_name)
    return env_name, server.id


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, ExitCode.INTERRUPTED),
                                       (signal.SIGTERM, ExitCode.SIGTERM)])
def test_signal_mid_gate_undoes_the_run(os_env, conn, releases, live_a, tmp_path, sig, code):
    """I3: SIGINT (inherited as ignored) or SIGTERM while green is being gated: exit
    130/143, A still live, green's server and port gone, no lock."""
    env_name, server_a = live_a
    proc = _start_paused(os_env, env_name, releases[1], tmp_path, "health_gate")
    try:
        _wait_reached(proc, tmp_path, "health_gate")
        assert len(live_servers(conn, env_name)) == 2
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err[-2000:]
    assert live_release(conn, env_name) == releases[0]
    assert fip_of(conn, env_name).port_id == port_of(conn, server_a).id
    _wait_gone(conn, env_name, {server_a})
    assert _lock(conn, env_name) is None


def test_sigkill_mid_gate_then_break_lock_then_deploy(os_env, conn, releases, live_a,
                                                     tmp_path):
    """I3/I11: SIGKILL leaves the lock (with its lease and host:pid) and the dead run's
    server; `cleanup --break-lock` says what it deletes and deletes it; a normal deploy of
    the same release then launches afresh and goes live."""
    env_name, server_a = live_a
    b = releases[1]
    proc = _start_paused(os_env, env_name, b, tmp_path, "health_gate")
    _wait_reached(proc, tmp_path, "health_gate")
    proc.kill()
    proc.communicate(timeout=60)
    lock = _lock(conn, env_name)
    assert lock is not None and lock.holder.endswith(f":{proc.pid}") and lock.expires
    dead = [s for s in live_servers(conn, env_name) if s.id != server_a]
    assert len(dead) == 1 and dead[0].metadata["modelserve_deploy_id"] == lock.deploy_id
    assert live_release(conn, env_name) == releases[0]

    res = rollout(os_env, "cleanup", "--break-lock", env_name=env_name)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "will delete" in res.stderr and dead[0].name in res.stderr, res.stderr[-2000:]
    _wait_gone(conn, env_name, {server_a})
    assert _lock(conn, env_name) is None

    ok(rollout(os_env, "deploy", "--release", b, "--no-probe", env_name=env_name))
    assert live_release(conn, env_name) == b


def test_stopped_previous_release_survives_cleanup(os_env, conn, releases, live_a):
    """I1: the recorded rollback target's server is SHUTOFF: cleanup keeps it."""
    env_name, server_a = live_a
    ok(rollout(os_env, "deploy", "--release", releases[1], "--no-probe", env_name=env_name))
    conn.compute.stop_server(server_a)
    conn.compute.wait_for_server(conn.compute.get_server(server_a), status="SHUTOFF", wait=120)
    ok(rollout(os_env, "cleanup", env_name=env_name))
    assert server_a in {s.id for s in live_servers(conn, env_name)}
    st = FipState.decode(fip_of(conn, env_name).description)
    assert st.previous == releases[0]


def test_stopped_live_release_survives_cleanup(os_env, conn, releases, live_a):
    """I1: the live front is SHUTOFF (a host reboot, an operator): cleanup deletes nothing of
    it and status still names it live, stopped."""
    env_name, server_a = live_a
    conn.compute.stop_server(server_a)
    conn.compute.wait_for_server(conn.compute.get_server(server_a), status="SHUTOFF", wait=120)
    res = rollout(os_env, "cleanup", env_name=env_name)
    assert res.returncode == 0, res.stderr[-2000:]
    assert server_a in {s.id for s in live_servers(conn, env_name)}
    st = rollout(os_env, "status", env_name=env_name)
    assert "stopped" in st.stdout and releases[0] in st.stdout, st.stdout


def test_two_deploys_racing_into_a_new_env_leave_one_floating_ip(os_env, conn, releases,
                                                                env_name):
    """I11: two CLI processes deploy into an env that does not exist yet: one floating IP
    for the env afterwards, one deploy live, the other refused as locked (or serialised)."""
    results = {}

    def deploy(key):
        results[key] = rollout(os_env, "deploy", "--release", releases[0], "--no-probe",
                               env_name=env_name)

    threads = [threading.Thread(target=deploy, args=(k,)) for k in ("x", "y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    codes = sorted(r.returncode for r in results.values())
    assert codes in ([0, 0], [0, ExitCode.LOCKED]), {k: (r.returncode, r.stderr[-800:])
                                                     for k, r in results.items()}
    ips = list(conn.network.ips(tags=f"modelserve-env-{env_name}"))
    assert len(ips) == 1, [i.floating_ip_address for i in ips]
    assert live_release(conn, env_name) == releases[0]
    assert _lock(conn, env_name) is None


def test_wrong_password_is_permanent_and_changes_nothing(os_env, conn, harness, releases,
                                                         live_a, tmp_path):
    """I10: a wrong password is an authentication failure: exit 6 with a line that says so,
    nothing changed, and Keystone sees one or two failed logins, not a retry storm that trips
    a lockout policy (the old code made 14)."""
    env_name, server_a = live_a
    clouds = Path(os_env["OS_CLIENT_CONFIG_FILE"]).read_text()
    assert "password:" in clouds
    bad = tmp_path / "clouds.yaml"
    lines = [(ln.split("password:")[0] + "password: not-the-password")
             if "password:" in ln else ln for ln in clouds.splitlines()]
    bad.write_text("\n".join(lines) + "\n")
    keystone_log = harness.layout.state / "log" / "keystone.log"

    def failed_logins() -> int:
        return keystone_log.read_text(errors="replace").count("Authorization failed")

    before_logins = failed_logins()
    before = fip_of(conn, env_name).revision_number
    res = rollout(os_env, "deploy", "--release", releases[1], "--no-probe", env_name=env_name,
                  extra_env={"OS_CLIENT_CONFIG_FILE": str(bad)})
    assert res.returncode == ExitCode.CLOUD, res.stderr[-2000:]
    assert "auth" in res.stderr.lower(), res.stderr[-2000:]
    assert 1 <= failed_logins() - before_logins <= 2, failed_logins() - before_logins
    assert fip_of(conn, env_name).revision_number == before
    assert {s.id for s in live_servers(conn, env_name)} == {server_a}


def test_plan_with_nothing_live_never_picks_a_bad_newest_image(os_env, conn, releases,
                                                               bundle_meta, env_name):
    """I4/I5: with nothing live, the newest image is a stand-in of accuracy 0.10 (skipped:
    not a baked release) and, newer still, a baked release of accuracy 0.10 (refused: below
    the quality floor, exit 3). Without the latter, the newest baked release is planned (one
    made here: the tier's stand-ins are no baked releases; plan boots nothing)."""
    from localcloud.openstack import seed

    tag = env_name
    made = []
    accuracy = str(bundle_meta["metrics"]["accuracy"])
    try:
        for name, provenance, built, acc in (
                (f"{tag}-good", "release", "2099-01-01", accuracy),
                (f"{tag}-standin", "standin", "2099-01-02", "0.1"),
                (f"{tag}-worse", "release", "2099-01-03", "0.1")):
            made.append(seed.upload_image(conn, name, f"disk of {name}".encode(), {
                "modelserve_model_sha256": bundle_meta["sha256"],
                "modelserve_model_accuracy": acc, "modelserve_provenance": provenance,
                "modelserve_accuracy_floor": str(bundle_meta["accuracy_floor"]),
                "modelserve_built_at": f"{built}T00:00:00Z", "modelserve_git_sha": "0" * 12,
            }))
        res = rollout(os_env, "plan", "--json", env_name=env_name)
        assert res.returncode == ExitCode.PLAN, res.stderr[-2000:]
        assert f"{tag}-worse" in res.stderr and "floor" in res.stderr, res.stderr[-2000:]
        conn.image.delete_image(made.pop().id)
        plan = json.loads(ok(rollout(os_env, "plan", "--json", env_name=env_name)).stdout)
        assert plan["release"] == f"{tag}-good", plan
        assert any("newest baked release" in n for n in plan["notes"]), plan["notes"]
    finally:
        for image in made:
            conn.image.delete_image(image.id, ignore_missing=True)
    assert not list(conn.network.ips(tags=f"modelserve-env-{env_name}"))  # I9: nothing made


def test_floating_ip_creation_mutex_is_exclusive_and_a_stale_one_is_broken(
        cloud, conn, env_name, monkeypatch):
    """I11 on OpenStack: creating an env's floating IP runs under a Neutron port whose MAC is
    derived from the env (a second port with that MAC is refused): while one run holds it, a
    second waits (and gives up with a transient error); a holder past MUTEX_STALE_S is broken."""
    from rollout.clouds import openstack as osc
    from rollout.errors import TransientCloudError

    monkeypatch.setattr(osc, "MUTEX_WAIT_S", 2.0)
    other = osc.OpenStackCloud()
    with cloud._creation_mutex(env_name):  # noqa: SLF001
        mutexes = list(conn.network.ports(mac_address=osc.mutex_mac(env_name)))
        assert [p.name for p in mutexes] == [f"modelserve-mutex-{env_name}"]
        with pytest.raises(TransientCloudError, match="mutex"):
            other.create_floating_ip(env_name)
        # the waiting run created nothing
        assert list(conn.network.ips(tags=f"modelserve-env-{env_name}")) == []
    assert list(conn.network.ports(mac_address=osc.mutex_mac(env_name))) == []
    # a run killed while holding it leaves the port: once stale, the next run breaks it
    net = other._network_id()  # noqa: SLF001
    conn.network.create_port(network_id=net, mac_address=osc.mutex_mac(env_name),
                             name=f"modelserve-mutex-{env_name}", fixed_ips=[])
    monkeypatch.setattr(osc, "MUTEX_STALE_S", 0.0)
    fip = other.create_floating_ip(env_name)
    assert fip.env == env_name and fip_of(conn, env_name).id == fip.id
    assert list(conn.network.ports(mac_address=osc.mutex_mac(env_name))) == []
