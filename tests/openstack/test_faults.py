"""Faults through the real services. Each ends with the live release serving (asked through
the floating IP), the floating IP where it was, and nothing of the failed run left behind."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest

from localcloud.openstack import seed
from rollout.cli import run
from rollout.clouds.base import FipState
from rollout.clouds.openstack import OpenStackCloud
from tests.openstack.osenv import (
    fip_of,
    live_release,
    live_servers,
    ok,
    port_of,
    purge_env,
    rollout,
    use_cloud_env,
)

pytestmark = pytest.mark.openstack


def assert_clean(conn, env_name, keep_ids, timeout=90):
    """Only `keep_ids` remain in the env (deletes are asynchronous: wait for them)."""
    deadline = time.monotonic() + timeout
    while True:
        ids = {s.id for s in live_servers(conn, env_name)}
        if ids == set(keep_ids):
            break
        assert time.monotonic() < deadline, f"left behind in {env_name}: {ids - set(keep_ids)}"
        time.sleep(1)
    assert len(list(conn.network.ips(tags=f"modelserve-env-{env_name}"))) == 1
    # every port of the private network belongs to a live server or the router
    net = conn.network.find_network(seed.LXD_NETWORK)
    all_servers = {s.id for s in conn.compute.servers()}
    for p in conn.network.ports(network_id=net.id):
        if (p.device_owner or "").startswith("compute:"):
            assert p.device_id in all_servers, f"orphan port {p.id} of {p.device_id}"


@pytest.fixture(scope="module")
def fenv(conn):
    """One environment for the whole fault matrix (each case starts from whatever release is
    live there, deploying one only if none is): fewer deploys keep the tier cheap in CI."""
    import secrets

    name = f"f{secrets.token_hex(3)}"
    yield name
    purge_env(conn, name)


def _status(os_env, env_name):
    return json.loads(ok(rollout(os_env, "status", "--json", env_name=env_name)).stdout)


@pytest.fixture
def live_a(os_env, conn, releases, fenv):
    """(env, live server id, live release, a release with no server in the env), deploying A
    if nothing is live. Deploying that last one always launches a new server (a warm
    previous release would be switched to without a launch)."""
    st = _status(os_env, fenv) if list(conn.network.ips(tags=f"modelserve-env-{fenv}")) \
        else {"live": None}
    if not st.get("live"):
        ok(rollout(os_env, "deploy", "--release", releases[0], "--no-probe", env_name=fenv))
        st = _status(os_env, fenv)
    live = st["live"]
    server = next(s for s in live_servers(conn, fenv)
                  if s.metadata["modelserve_release"] == live
                  and fip_of(conn, fenv).port_id == port_of(conn, s.id).id)
    present = {s.metadata["modelserve_release"] for s in live_servers(conn, fenv)}
    fresh = next(r for r in releases if r not in present)
    return fenv, server.id, live, fresh


def _still_serving_a(conn, env_name, server_id, a):
    assert live_release(conn, env_name) == a
    assert fip_of(conn, env_name).port_id == port_of(conn, server_id).id
    assert_clean(conn, env_name, {server_id})


def _run_in_process(os_env, monkeypatch, argv, hook):
    """rollout's CLI in this process, with a before_step hook on the real OpenStack cloud."""
    use_cloud_env(os_env, monkeypatch)
    out, err = io.StringIO(), io.StringIO()

    def configure(ctx):
        ctx.before_step = hook

    code = run(argv, stdout=out, stderr=err, configure=configure)
    return code, out.getvalue(), err.getvalue()


def test_server_in_error_leaves_a_serving(os_env, conn, live_a):
    env_name, server_a, a, b = live_a
    proc = rollout(os_env, "deploy", "--release", b, "--no-probe", env_name=env_name,
                   extra_env={"MODELSERVE_OS_FLAVOR": seed.FLAVOR_HUGE})
    assert proc.returncode != 0
    assert "ERROR" in proc.stderr and "No valid host" in proc.stderr, proc.stderr[-2000:]
    _still_serving_a(conn, env_name, server_a, a)


def test_quota_exhaustion_leaves_a_serving(os_env, conn, admin, live_a):
    env_name, server_a, a, b = live_a
    project = conn.current_project_id
    used = len(list(admin.compute.servers(all_projects=True, project_id=project)))
    admin.set_compute_quotas(project, instances=used)
    try:
        proc = rollout(os_env, "deploy", "--release", b, "--no-probe", env_name=env_name)
    finally:
        admin.set_compute_quotas(project, instances=seed.QUOTA_INSTANCES)
    assert proc.returncode != 0
    assert "quota" in proc.stderr.lower(), proc.stderr[-2000:]
    _still_serving_a(conn, env_name, server_a, a)


def test_concurrent_floating_ip_change_is_refused(os_env, conn, live_a, monkeypatch):
    """Another operator updates the floating IP between our read and our switch: Neutron
    answers 412 to our If-Match, and the deploy fails cleanly instead of overwriting."""
    env_name, server_a, a, b = live_a
    raced = []

    class RacingCloud(OpenStackCloud):
        def update_floating_ip(self, fip, *, target, state, if_revision):
            if target and target != fip.target and not raced:
                current = fip_of(conn, env_name)  # the other operator's write, for real
                other = json.loads(current.description or "{}")
                other["x"] = "another operator"  # a real change: Neutron bumps the revision
                conn.network.update_ip(current.id, description=json.dumps(other))
                raced.append(current.revision_number)
            return super().update_floating_ip(fip, target=target, state=state,
                                              if_revision=if_revision)

    use_cloud_env(os_env, monkeypatch)
    out, err = io.StringIO(), io.StringIO()
    code = run(["deploy", "--cloud", "openstack", "--env", env_name, "--release", b,
                "--no-probe"], stdout=out, stderr=err, cloud=RacingCloud())
    assert raced, "the switch never happened"
    assert code != 0, err.getvalue()
    assert "412" in err.getvalue(), err.getvalue()[-2000:]
    _still_serving_a(conn, env_name, server_a, a)
    assert FipState.decode(fip_of(conn, env_name).description).lock is None


def _bounce(harness, name, down_for=3.0):
    """Stop a service now; start it again in the background after `down_for` seconds."""
    harness.procs.stop(name)

    def later():
        time.sleep(down_for)
        harness.services_up()

    t = threading.Thread(target=later, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("service, at_step", [("nova-api", "launch_front"),
                                              ("neutron", "switch")])
def test_service_restart_mid_deploy_is_ridden_out(os_env, conn, harness, live_a, monkeypatch,
                                                  service, at_step):
    """Nova's API vanishes as the server is created, or Neutron's as the floating IP is
    switched: the named retry policies carry the deploy through once it is back."""
    env_name, _server, _a, b = live_a
    threads = []

    def hook(step):
        if step.kind == at_step and not threads:
            threads.append(_bounce(harness, service))

    code, out, err = _run_in_process(
        os_env, monkeypatch,
        ["deploy", "--cloud", "openstack", "--env", env_name, "--release", b, "--no-probe"],
        hook)
    assert threads, f"step {at_step} never ran"
    threads[0].join(120)
    assert all(harness.status().values()), harness.status()
    assert code == 0, err[-3000:]
    assert live_release(conn, env_name) == b
    sb = [s for s in live_servers(conn, env_name) if s.metadata["modelserve_release"] == b]
    assert fip_of(conn, env_name).port_id in {port_of(conn, s.id).id for s in sb}


def test_rollback_when_the_previous_server_was_deleted(os_env, conn, live_a):
    env_name, server_live, live, fresh = live_a
    previous = _status(os_env, env_name).get("previous")
    if not previous:  # run alone: make a rollback target first
        ok(rollout(os_env, "deploy", "--release", fresh, "--no-probe", env_name=env_name))
        previous, live = live, fresh
        server_live = next(s.id for s in live_servers(conn, env_name)
                           if s.metadata["modelserve_release"] == live)
    doomed = [s for s in live_servers(conn, env_name)
              if s.metadata["modelserve_release"] == previous]
    assert doomed, f"no server of the rollback target {previous}"
    for s in doomed:
        conn.compute.delete_server(s.id)
    for s in doomed:
        conn.compute.wait_for_delete(s, wait=120)
    keep = {s.id for s in live_servers(conn, env_name)}
    proc = rollout(os_env, "rollback", "--no-probe", env_name=env_name)
    assert proc.returncode != 0
    assert "roll back" in proc.stderr.lower() or "rollback" in proc.stderr.lower(), proc.stderr
    assert live_release(conn, env_name) == live
    assert fip_of(conn, env_name).port_id == port_of(conn, server_live).id
    assert_clean(conn, env_name, keep)
