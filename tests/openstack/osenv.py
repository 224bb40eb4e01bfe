"""Helpers of the OpenStack tier (fixtures live in conftest.py): run the CLI against the
harness, and read the env's servers, floating IPs and live release through the APIs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rollout.clouds.base import preview_env
from rollout.clouds.openstack import env_tag

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def rollout(os_env, *args, env_name, extra_env=None, timeout=600):
    """`python -m rollout <cmd> --cloud openstack --env NAME ...`; returns CompletedProcess."""
    cmd, *rest = args
    env = dict(os_env, **(extra_env or {}))
    return subprocess.run([PY, "-m", "rollout", cmd, "--cloud", "openstack", "--env", env_name,
                           *rest], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc


def servers_of(conn, env_name):
    return list(conn.compute.servers(details=True, tags=env_tag(env_name)))


def live_servers(conn, env_name):
    """The env's servers that are not (yet) deleted: Nova lists DELETED ones for a while."""
    return [s for s in servers_of(conn, env_name) if s.status != "DELETED"]


def purge_env(conn, env_name):
    """Delete every server and the floating IPs (main and preview) of one env (a test's own
    teardown)."""
    for server in servers_of(conn, env_name):
        conn.compute.delete_server(server.id, ignore_missing=True)
    for server in servers_of(conn, env_name):
        conn.compute.wait_for_delete(server, wait=120)
    for tag in (env_tag(env_name), env_tag(preview_env(env_name))):
        for ip in conn.network.ips(tags=tag):
            conn.network.delete_ip(ip.id, ignore_missing=True)


def fip_of(conn, env_name):
    ips = list(conn.network.ips(tags=env_tag(env_name)))
    assert len(ips) == 1, f"env {env_name} has {len(ips)} floating IPs"
    return ips[0]


def port_of(conn, server_id):
    ports = list(conn.network.ports(device_id=server_id))
    assert len(ports) == 1
    return ports[0]


def version_via(address, port=8080):
    import requests

    r = requests.get(f"http://{address}:{port}/version", timeout=5,
                     headers={"Connection": "close"})
    r.raise_for_status()
    return r.json()


def live_release(conn, env_name):
    """The release the floating IP really serves, asked through the floating IP itself."""
    fip = fip_of(conn, env_name)
    return version_via(fip.floating_ip_address)["release"]
