"""Secrets stay out of `-v` output on a real control plane.

With -v, keystoneauth logs every request and response body: the create-server request and each
server read carry the base64 seed holding the broker and Redis passwords. Each run's stderr is
checked for the passwords, in plain text and inside the base64 seed.
"""

from __future__ import annotations

import base64

import pytest

from rollout.seed import parse_user_data
from tests.openstack.osenv import live_servers, ok, rollout

pytestmark = pytest.mark.openstack


def test_verbose_deploy_and_status_print_no_seed_and_no_password(os_env, conn, admin, releases,
                                                                  env_name):
    a = releases[0]
    deploy = ok(rollout(os_env, "deploy", "--release", a, "-v", env_name=env_name))
    status = ok(rollout(os_env, "status", "-v", env_name=env_name))
    (server,) = live_servers(conn, env_name)
    raw = admin.compute.get_server(server.id).user_data
    seed = parse_user_data(base64.b64decode(raw).decode())
    secrets = {"broker password": seed["MODELSERVE_BROKER_PASSWORD"],
               "redis password": seed["MODELSERVE_REDIS_PASSWORD"], "seed (base64)": raw}
    # the debug output really is there: the check below would see a leak
    assert "REQ: curl" in deploy.stderr and "servers" in deploy.stderr, deploy.stderr[-2000:]
    assert '"user_data": "<redacted>"' in deploy.stderr  # the create-server request
    assert "REQ: curl" in status.stderr
    for run, out in (("deploy -v", deploy.stderr + deploy.stdout),
                     ("status -v", status.stderr + status.stdout)):
        for what, secret in secrets.items():
            assert secret not in out, f"{run} printed the {what}"
