"""`python -m rollout --cloud openstack` end to end, checked through the OpenStack APIs.

Each server is a container on the harness's LXD compute host, booted by Nova from a stand-in
release image in Glance (tests/openstack/standins.py): cloud-init runs rollout's NoCloud seed
from Nova's user_data, and the stand-in app serves from what it wrote, so the health gate, the
load probe and the /version check through the floating IP (an LXD network forward) go through
real servers. The real image's services are test_lxd_release.py's.
"""

from __future__ import annotations

import base64
import json
import subprocess

import pytest
import requests

from rollout.clouds.base import FipState, InstanceSpec
from rollout.clouds.openstack import env_tag
from rollout.seed import parse_user_data
from tests.openstack.osenv import (
    fip_of,
    live_release,
    ok,
    port_of,
    rollout,
    servers_of,
    wait_deleted,
)

pytestmark = pytest.mark.openstack


def _server(conn, env_name, release):
    found = [s for s in servers_of(conn, env_name)
             if s.metadata.get("modelserve_release") == release]
    assert len(found) == 1, f"{len(found)} servers of {release} in {env_name}"
    return found[0]


def _check_seed(admin, server, *, release, colour, env_name, tmp_path):
    """user_data decodes to a schema-valid cloud-config saying who the server is."""
    raw = admin.compute.get_server(server.id).user_data
    text = base64.b64decode(raw).decode()
    seed_file = tmp_path / f"{server.id}.yaml"
    seed_file.write_text(text)
    schema = subprocess.run(["cloud-init", "schema", "-c", str(seed_file)],
                            capture_output=True, text=True)
    assert schema.returncode == 0, schema.stdout + schema.stderr
    values = parse_user_data(text)
    assert values["MODELSERVE_ROLE"] == "front"
    assert values["MODELSERVE_COLOUR"] == colour
    assert values["MODELSERVE_RELEASE"] == release
    assert values["MODELSERVE_ENV"] == env_name
    assert values["MODELSERVE_DEPLOY_ID"] == server.metadata["modelserve_deploy_id"]


def test_deploy_deploy_rollback_status_history_plan_cleanup(
        os_env, conn, admin, releases, env_name, cloud, tmp_path):
    a, b = releases[:2]
    images = {i.properties.get("modelserve_release"): i.id for i in conn.image.images()
              if (i.properties or {}).get("modelserve_release") in (a, b)}

    # plan first: steps printed, nothing created
    plan = ok(rollout(os_env, "plan", "--release", a, "--json", env_name=env_name))
    kinds = [s["kind"] for s in json.loads(plan.stdout)["steps"]]
    assert "launch_front" in kinds and "switch" in kinds
    assert servers_of(conn, env_name) == []
    assert list(conn.network.ips(tags=env_tag(env_name))) == []

    # deploy A
    res = json.loads(ok(rollout(os_env, "deploy", "--release", a, "--json",
                                env_name=env_name)).stdout)
    assert res["release"] == a
    sa = _server(conn, env_name, a)
    assert sa.status == "ACTIVE" and sa.image.id == images[a]
    assert {"modelserve", env_tag(env_name)} <= set(sa.tags)
    assert sa.metadata["modelserve_env"] == env_name
    assert sa.metadata["modelserve_role"] == "front"
    colour_a = sa.metadata["modelserve_colour"]
    _check_seed(admin, sa, release=a, colour=colour_a, env_name=env_name, tmp_path=tmp_path)
    fip = fip_of(conn, env_name)
    assert fip.port_id == port_of(conn, sa.id).id and fip.status == "ACTIVE"
    assert FipState.decode(fip.description).live == a
    assert live_release(conn, env_name) == a

    # deploy B, with the load probe on the floating IP
    res = json.loads(ok(rollout(os_env, "deploy", "--release", b, "--json",
                                env_name=env_name)).stdout)
    assert res["probe"]["total"] > 0 and res["probe"]["failed"] == 0, res["probe"]
    sb = _server(conn, env_name, b)
    colour_b = sb.metadata["modelserve_colour"]
    assert colour_b != colour_a
    _check_seed(admin, sb, release=b, colour=colour_b, env_name=env_name, tmp_path=tmp_path)
    assert fip_of(conn, env_name).port_id == port_of(conn, sb.id).id
    assert live_release(conn, env_name) == b
    assert _server(conn, env_name, a).status == "ACTIVE"  # blue kept warm

    # rollback to A
    res = json.loads(ok(rollout(os_env, "rollback", "--json", env_name=env_name)).stdout)
    assert res["probe"]["failed"] == 0, res["probe"]
    assert fip_of(conn, env_name).port_id == port_of(conn, sa.id).id
    assert live_release(conn, env_name) == a

    # status --json: the truth as the cloud holds it
    st = json.loads(ok(rollout(os_env, "status", "--json", env_name=env_name)).stdout)
    assert st["cloud"] == "openstack" and st["live"] == a and st["previous"] == b
    assert st["floating_ip"] == fip_of(conn, env_name).floating_ip_address
    assert {i["release"] for i in st["instances"]} == {a, b}
    assert st["lock"] is None

    # history: three switches, oldest first
    hist = json.loads(ok(rollout(os_env, "history", "--json", env_name=env_name)).stdout)
    assert [(e["action"], e["release"]) for e in hist] == [
        ("deploy", a), ("deploy", b), ("rollback", a)]

    # plan B again: a dry run changes nothing
    before = ({s.id for s in servers_of(conn, env_name)}, fip_of(conn, env_name).revision_number)
    ok(rollout(os_env, "plan", "--release", b, env_name=env_name))
    after = ({s.id for s in servers_of(conn, env_name)}, fip_of(conn, env_name).revision_number)
    assert before == after

    # cleanup: a leftover of a dead run goes; the live release and the rollback target stay,
    # and so does anything of theirs (invariant I1: never an instance of live or previous)
    def leftover(release_name, deploy_id):
        rel = cloud.find_release(release_name)
        inst = cloud.create_instance(InstanceSpec(
            name=f"ms-{env_name}-{release_name}-front0-{deploy_id}", release=rel,
            labels={"env": env_name, "release": release_name, "colour": colour_b,
                    "role": "front", "deploy_id": deploy_id,
                    "created_at": "2026-01-01T00:00:00Z", "model_sha256": rel.model_sha256},
            user_data="#cloud-config\n{}\n"))
        cloud.wait_for_instance(inst.id, timeout=120)
        return inst

    orphan = leftover(releases[2], "dead00")
    of_previous = leftover(b, "dead01")  # b is the rollback target now
    ok(rollout(os_env, "cleanup", env_name=env_name))
    left = wait_deleted(conn, env_name, {orphan.id})
    assert orphan.id not in left
    assert {sa.id, sb.id, of_previous.id} <= left
    assert live_release(conn, env_name) == a


def test_worker_tier_joins_the_front(os_env, conn, admin, releases, env_name):
    """--workers 1: a worker-role server, seeded with its front's address, joins that front:
    the gate saw it serving, and the front still lists it."""
    a = releases[0]
    ok(rollout(os_env, "deploy", "--release", a, "--workers", "1", "--no-probe",
               env_name=env_name))
    servers = servers_of(conn, env_name)
    roles = {s.metadata["modelserve_role"]: s for s in servers}
    assert sorted(s.metadata["modelserve_role"] for s in servers) == ["front", "worker"]
    front_ip = next(iter(roles["front"].addresses.values()))[0]["addr"]
    seeds = {role: parse_user_data(base64.b64decode(
        admin.compute.get_server(s.id).user_data).decode()) for role, s in roles.items()}
    assert seeds["worker"]["MODELSERVE_ROLE"] == "worker"
    # the seed's broker path is TLS (amqps/rediss, the deploy's CA)
    assert seeds["worker"]["MODELSERVE_BROKER_URL"].startswith("amqps://")
    assert f"@{front_ip}:5671/" in seeds["worker"]["MODELSERVE_BROKER_URL"]
    assert seeds["worker"]["MODELSERVE_RESULT_URL"].startswith("rediss://:")
    assert seeds["front"]["MODELSERVE_BROKER_PEERS"] == "any"  # addresses unknown beforehand
    assert seeds["worker"]["MODELSERVE_BROKER_USER"] == seeds["front"]["MODELSERVE_BROKER_USER"]
    # the worker server found its front from the seed's broker address: the front lists it
    # (the stand-in's worker announces itself over HTTP; the real image's worker consumes the
    # front's broker, test_lxd_release.py)
    workers = requests.get(f"http://{front_ip}:8080/api/v1/workers", timeout=5).json()
    assert [w["instance"].split(".")[0] for w in workers["workers"]] == [roles["worker"].name], \
        workers
    assert live_release(conn, env_name) == a
