"""Helpers of the OpenStack tier (fixtures live in conftest.py): run the CLI against the
harness, and read the env's servers, floating IPs and live release through the APIs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from rollout.clouds.base import preview_env
from rollout.clouds.openstack import env_tag

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
# what the provider reads from the environment (conftest's os_env sets them all)
CLOUD_ENV = ("OS_CLIENT_CONFIG_FILE", "OS_CLOUD", "XDG_CACHE_HOME",
             "MODELSERVE_OS_EXTERNAL_NETWORK", "MODELSERVE_OS_FLAVOR")


def use_cloud_env(os_env, monkeypatch):
    """This process's environment as the CLI's (an in-process provider or CLI run)."""
    for key in CLOUD_ENV:
        monkeypatch.setenv(key, os_env[key])


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


def wait_deleted(conn, env_name, server_ids, timeout=120):
    """The env's live servers once none of ``server_ids`` is among them any more (Nova
    deletes asynchronously: the LXD host stops and deletes the container first); those still
    there after ``timeout`` s stay in the answer."""
    deadline = time.monotonic() + timeout
    while True:
        left = {s.id for s in live_servers(conn, env_name)}
        if not left & set(server_ids) or time.monotonic() > deadline:
            return left
        time.sleep(1)


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
