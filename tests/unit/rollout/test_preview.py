"""Preview, promote and abort (issue 11) on the in-memory cloud, whose fronts and floating IPs
answer real HTTP: ``deploy --preview`` serves green on a second, stable address without
switching; a deploy meanwhile is refused; ``promote`` switches (gate, analysis); ``abort``
deletes green; the lock is not held in between."""

from __future__ import annotations

import io
import json

import pytest

from rollout import cli, executor
from rollout.clouds.base import FipState, Lock, Preview, preview_env
from rollout.errors import AnalysisFailed, CloudError, PlanError
from rollout.health import fetch_version
from rollout.planner import AbortRequest, DeployRequest, PromoteRequest, RollbackRequest
from tests.unit.rollout.fakecloud import ctx_for

ENV = "dev"


@pytest.fixture
def cloud(fake_cloud):
    return fake_cloud("abc")


def deploy(cloud, release, *, preview=False, **kw):
    ctx = ctx_for(cloud, **kw)
    return executor.deploy(ctx, DeployRequest(ENV, ctx.deploy_id, release=release,
                                              preview=preview))


def promote(cloud, **kw):
    ctx = ctx_for(cloud, **kw)
    return executor.promote(ctx, PromoteRequest(ENV, ctx.deploy_id))


def abort(cloud):
    ctx = ctx_for(cloud)
    return executor.abort(ctx, AbortRequest(ENV, ctx.deploy_id))


def serves(cloud, env) -> str | None:
    """The release /version names through an env's floating IP (None: it serves nothing)."""
    fip = cloud.fips.get(env)
    if fip is None or not fip.target:
        return None
    return fetch_version(fip.address, cloud.port).get("release")


def releases_running(cloud) -> set[str]:
    return {i.release for i in cloud.instances.values()}


def test_preview_serves_green_on_its_own_address_and_blocks_deploys_until_promoted(cloud):
    deploy(cloud, "a")
    res = deploy(cloud, "b", preview=True)
    assert res["action"] == "preview" and res["preview"]["release"] == "b"
    assert serves(cloud, ENV) == "a"  # not switched
    assert serves(cloud, preview_env(ENV)) == "b"
    assert res["preview"]["address"] == cloud.fips[preview_env(ENV)].address
    state = cloud.fips[ENV].state
    assert state.lock is None  # the lock is not held between preview and promote
    assert state.preview == Preview("b", res["deploy_id"]) and state.live == "a"

    before = (dict(cloud.instances), cloud.fips[ENV].revision)
    with pytest.raises(PlanError, match=r"pending preview of release b .*promote.*abort"):
        deploy(cloud, "c")
    assert (dict(cloud.instances), cloud.fips[ENV].revision) == before  # nothing touched

    st = executor.status(ctx_for(cloud))
    assert st["preview"]["release"] == "b" and st["preview"]["url"] == res["preview"]["url"]
    res = promote(cloud)
    assert res["action"] == "promote" and serves(cloud, ENV) == "b"
    assert "launch_front" not in [s["kind"] for s in res["steps"]]  # the preview's own set
    fip = cloud.fips[ENV]
    assert fip.state.preview is None and fip.state.previous == "a" and fip.state.lock is None
    assert serves(cloud, preview_env(ENV)) is None
    assert [e.action for e in fip.history] == ["deploy", "preview", "promote"]
    assert executor.status(ctx_for(cloud))["preview"] is None

    first_address = cloud.fips[preview_env(ENV)].address
    deploy(cloud, "c", preview=True)  # the preview address is stable across deploys
    assert cloud.fips[preview_env(ENV)].address == first_address
    assert serves(cloud, preview_env(ENV)) == "c"


def test_abort_deletes_green_and_keeps_live_and_previous(cloud):
    deploy(cloud, "a")
    deploy(cloud, "b")
    res = deploy(cloud, "c", preview=True)
    res = abort(cloud)
    assert res["action"] == "abort" and releases_running(cloud) == {"a", "b"}
    assert serves(cloud, ENV) == "b" and serves(cloud, preview_env(ENV)) is None
    fip = cloud.fips[ENV]
    assert fip.state.preview is None and fip.state.previous == "a"
    assert fip.history[-1].action == "abort" and fip.history[-1].release == "c"
    deploy(cloud, "c")  # deploys work again
    assert serves(cloud, ENV) == "c"


def test_a_preview_of_the_warm_previous_release_only_ends_on_abort(cloud):
    deploy(cloud, "a")
    deploy(cloud, "b")
    res = deploy(cloud, "a", preview=True)  # reuses a's warm set
    assert "launch_front" not in [s["kind"] for s in res["steps"]]
    assert serves(cloud, preview_env(ENV)) == "a"
    res = abort(cloud)
    assert "delete_instances" not in [s["kind"] for s in res["steps"]]
    assert releases_running(cloud) == {"a", "b"}
    assert any("keeping" in n for n in res["notes"])


def test_nothing_pending_refuses_promote_and_abort(cloud):
    deploy(cloud, "a")
    with pytest.raises(PlanError, match="no pending preview"):
        promote(cloud)
    with pytest.raises(PlanError, match="no pending preview"):
        abort(cloud)


def test_cleanup_spares_the_preview_and_a_rollback_keeps_it(cloud):
    deploy(cloud, "a")
    deploy(cloud, "b")
    deploy(cloud, "c", preview=True)
    ctx = ctx_for(cloud)
    executor.cleanup(ctx, keep=2, images=False, break_lock=False)
    assert releases_running(cloud) == {"a", "b", "c"}
    ctx = ctx_for(cloud)
    executor.rollback(ctx, RollbackRequest(ENV, ctx.deploy_id))
    assert serves(cloud, ENV) == "a"
    assert cloud.fips[ENV].state.preview.release == "c"
    assert serves(cloud, preview_env(ENV)) == "c"


def test_a_promote_whose_analysis_fails_switches_back_and_the_preview_stays(cloud):
    deploy(cloud, "a")
    deploy(cloud, "b", preview=True)
    green = next(i for i in cloud.instances.values() if i.release == "b")

    def turn_bad(step):
        if step.kind == "verify":
            cloud.apps[green.id].degrade("fail", 0.2)
    with pytest.raises(AnalysisFailed) as err:
        promote(cloud, analysis_window=3, before_step=turn_bad)
    assert err.value.rolled_back and serves(cloud, ENV) == "a"
    fip = cloud.fips[ENV]
    assert fip.state.preview is not None and fip.state.preview.release == "b"
    assert green.id in cloud.instances  # left for inspection: abort deletes it
    assert fip.history[-1].action == "analysis_failed"
    abort(cloud)
    assert releases_running(cloud) == {"a"}


def test_a_failed_preview_is_undone(cloud):
    deploy(cloud, "a")
    before = set(cloud.instances)

    def fail_the_state_write(step):
        if step.kind == "preview":  # the preview address is aimed, recording it fails
            cloud.fail["update_floating_ip"] = [None, CloudError("boom")]
    with pytest.raises(CloudError, match="boom"):
        deploy(cloud, "b", preview=True, before_step=fail_the_state_write)
    assert set(cloud.instances) == before and serves(cloud, ENV) == "a"
    assert serves(cloud, preview_env(ENV)) is None
    assert cloud.fips[ENV].state.preview is None and cloud.fips[ENV].state.lock is None


def test_the_preview_survives_a_state_round_trip_within_neutrons_limit():
    st = FipState("r" * 30, "p" * 30, Lock("someone@a-long-hostname.example:123456",
                                          "2026-11-28T12:00:00Z", "abc123",
                                          "2026-11-28T12:10:00Z"), Preview("v" * 30, "def456"))
    assert FipState.decode(st.encode()) == st
    assert len(st.encode()) <= 255
    assert FipState.decode('{"v":"garbage"}').preview is None


def run_cli(cloud, *args):
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(list(args), cloud=cloud, stdout=out, stderr=err,
                   configure=lambda ctx: setattr(ctx, "sleep", lambda s: None) or setattr(
                       ctx, "port", cloud.port))
    return code, out.getvalue(), err.getvalue()


def test_the_cli_previews_refuses_a_deploy_and_promotes(cloud):
    assert run_cli(cloud, "deploy", "--env", ENV, "--release", "a", "--no-probe")[0] == 0
    code, out, err = run_cli(cloud, "deploy", "--env", ENV, "--release", "b", "--preview",
                             "--json")
    assert code == 0, err
    assert json.loads(out)["preview"]["release"] == "b" and "preview ready" in err
    code, _, err = run_cli(cloud, "deploy", "--env", ENV, "--release", "c")
    assert code == cli.ExitCode.PLAN and "pending preview of release b" in err
    code, out, _ = run_cli(cloud, "status", "--env", ENV)
    assert "preview b at http://" in out
    code, _, err = run_cli(cloud, "abort", "--env", ENV)
    assert code == 0 and "preview aborted" in err
    code, _, err = run_cli(cloud, "promote", "--env", ENV)
    assert code == cli.ExitCode.PLAN and "no pending preview" in err


def test_a_receiver_gets_the_events_of_preview_abort_and_promote(cloud, receiver):
    url, events = receiver
    assert run_cli(cloud, "deploy", "--env", ENV, "--release", "a", "--no-probe")[0] == 0
    for args in (("deploy", "--release", "b", "--preview"), ("abort",),
                 ("deploy", "--release", "b", "--preview"), ("promote", "--no-probe")):
        code, _, err = run_cli(cloud, *args, "--env", ENV, "--notify", url)
        assert code == 0, err
    got = [(e["type"].rsplit(".", 1)[-1], e["data"]["action"]) for e in events]
    assert got == [("started", "preview"), ("gated", "preview"), ("previewed", "preview"),
                   ("started", "abort"), ("aborted", "abort"),
                   ("started", "preview"), ("gated", "preview"), ("previewed", "preview"),
                   ("started", "promote"), ("gated", "promote"), ("switched", "promote"),
                   ("promoted", "promote")], got
    assert all(e["data"]["release"] == "b" and e["data"]["from_release"] == "a"
               for e in events)
