"""Post-switch analysis: the pure thresholds (hypothesis) and the executor on the in-memory
cloud, whose fronts answer real HTTP and can turn failing or slow after N seconds."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollout import analysis, cli, executor
from rollout.analysis import Figures, Thresholds, judge, judge_server, parse_metrics, percentile
from rollout.clouds.base import HistoryEvent, Release
from rollout.errors import AnalysisFailed, Cancelled
from rollout.planner import DeployRequest
from tests.unit.rollout.fakecloud import FakeCloud, free_port

ENV = "dev"
TH = Thresholds()


# -- pure ---------------------------------------------------------------------------------
def test_percentile_is_nearest_rank():
    assert percentile([], 99) is None
    assert percentile([5.0], 50) == 5.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile(list(range(1, 101)), 50) == 50
    assert percentile([1, 2, 3], 99) == 3


@given(st.lists(st.floats(0, 1e4), min_size=1, max_size=200), st.floats(1, 100))
def test_percentile_is_one_of_the_values_and_monotone(values, q):
    p = percentile(values, q)
    assert p in values and p <= percentile(values, 100) == max(values)
    assert percentile(values, q / 2) <= p


@given(st.integers(1, 10_000), st.integers(0, 10_000))
def test_error_rate_breach_iff_above_the_threshold(total, failed):
    failed = min(failed, total)
    reasons = judge(Figures(total, failed, (1.0,) * (total - failed)), None, TH)
    assert bool(reasons) == (failed / total > TH.max_error_rate)


def test_no_request_at_all_is_a_breach():
    assert judge(Figures(0, 0), None, TH)


@given(st.floats(0.1, 500), st.floats(0, 5000), st.integers(0, 50))
def test_p99_breach_needs_the_limit_and_more_than_one_slow_request(base_ms, now_ms, slow):
    base = Figures(100, 0, (base_ms,) * 100)
    now = Figures(100, 0, (base_ms,) * (100 - slow) + (now_ms,) * slow)
    limit = TH.p99_limit_ms(base_ms)
    breach = bool(judge(now, base, TH))
    assert breach == (now_ms > limit and slow >= 2)


def test_latency_is_not_judged_without_a_baseline():
    assert not judge(Figures(100, 0, (10_000.0,) * 100), None, TH)


def test_metrics_text_is_parsed_and_metrics_route_excluded():
    text = """# HELP modelserve_http_requests_total HTTP requests by route and status
# TYPE modelserve_http_requests_total counter
modelserve_http_requests_total{method="POST",route="/api/v1/predictions",status="200"} 90.0
modelserve_http_requests_total{method="POST",route="/api/v1/predictions",status="503"} 10.0
modelserve_http_requests_total{method="GET",route="/metrics",status="200"} 7.0
modelserve_http_requests_created{method="GET",route="/metrics",status="200"} 1.7e9
"""
    counts = parse_metrics(text)
    assert (counts.requests, counts.errors) == (100.0, 10.0)
    assert parse_metrics("nothing here") is None
    delta = analysis.server_delta(analysis.ServerCounts(50, 0), counts)
    assert delta == {"requests": 50, "errors": 10, "error_rate": 0.2}
    assert judge_server(delta, TH) and not judge_server({"requests": 0, "errors": 0,
                                                         "error_rate": 0.0}, TH)
    assert analysis.server_delta(counts, analysis.ServerCounts(1, 0)) is None  # restarted


def test_history_detail_round_trips_and_old_events_still_decode():
    ev = HistoryEvent("t", "analysis_failed", "b", "a", "d1", "err=50.00%/0.00% n=10/5")
    assert HistoryEvent.decode(ev.encode()) == ev
    assert HistoryEvent.decode("t;deploy;b;a;d1") == HistoryEvent("t", "deploy", "b", "a", "d1")


# -- the executor on the in-memory cloud -----------------------------------------------------
@pytest.fixture
def cloud():
    c = FakeCloud([
        Release(f"img-{r}", f"modelserve-{r}", r, f"sha-{r}", 0.78, built_at=f"2026-01-0{n}")
        for n, r in enumerate("abc", 1)], port=free_port())
    yield c
    c.close()


def ctx_for(cloud, **kw) -> executor.Context:
    return executor.Context(cloud=cloud, env=ENV, sleep=lambda s: None, port=cloud.port, **kw)


def deploy(cloud, release, **kw):
    ctx = ctx_for(cloud, **kw)
    return executor.deploy(ctx, DeployRequest(ENV, ctx.deploy_id, release=release))


def live(cloud):
    fip = cloud.fips.get(ENV)
    inst = next((i for i in cloud.instances.values() if fip and i.port == fip.target), None)
    return inst.release if inst else None


def degrade_green(cloud, mode, after_s=0.0, **kw):
    """A before_step hook: once the switch is verified, the new front turns bad."""
    def hook(step):
        if step.kind == "verify":
            green = next(i for i in cloud.instances.values() if i.release == step.release)
            cloud.apps[green.id].degrade(mode, after_s, **kw)
    return hook


def test_a_healthy_release_passes_and_history_has_the_figures(cloud):
    deploy(cloud, "a")
    res = deploy(cloud, "b", analysis_window=1.5)
    assert live(cloud) == "b"
    assert res["analysis"]["outcome"] == "passed" and res["analysis"]["now"]["requests"] > 0
    assert res["analysis"]["baseline"]["requests"] > 0
    last = cloud.fips[ENV].history[-1]
    assert (last.action, last.release, last.from_release) == ("deploy", "b", "a")
    assert last.detail.startswith("analysis passed err=0.00%")
    assert f"probe=0/{res['probe']['total']} failed" in last.detail  # the switch probe too
    assert cloud.fips[ENV].state.lock is None


def test_a_release_that_starts_failing_is_switched_back_with_the_figures(cloud):
    deploy(cloud, "a")
    before = set(cloud.instances)
    state_before = cloud.fips[ENV].state
    with pytest.raises(AnalysisFailed, match="error rate") as err:
        deploy(cloud, "b", analysis_window=3, before_step=degrade_green(cloud, "fail", 0.3))
    assert err.value.rolled_back and err.value.verdict.early  # judged before the window's end
    assert live(cloud) == "a" and set(cloud.instances) == before  # green deleted
    fip = cloud.fips[ENV]
    assert fip.state.lock is None and (fip.state.live, fip.state.previous) == (
        state_before.live, state_before.previous)
    last = fip.history[-1]
    assert (last.action, last.release, last.from_release) == ("analysis_failed", "b", "a")
    assert "err=" in last.detail and "rolled back to a" in last.detail
    assert [e.action for e in fip.history] == ["deploy", "analysis_failed"]


def test_a_release_that_turns_slow_breaches_p99(cloud):
    deploy(cloud, "a")
    with pytest.raises(AnalysisFailed, match="p99"):
        deploy(cloud, "b", analysis_window=3,
               before_step=degrade_green(cloud, "slow", 0.0, slow_s=0.3))
    assert live(cloud) == "a"


def test_window_zero_skips_the_analysis(cloud):
    deploy(cloud, "a")
    res = deploy(cloud, "b", analysis_window=0,
                 before_step=degrade_green(cloud, "fail", 0.0))
    assert live(cloud) == "b" and res["analysis"] is None
    detail = cloud.fips[ENV].history[-1].detail  # the model-diff gate's figures only
    assert "analysis" not in detail and detail.startswith("diff flipped=0/")


def test_the_old_releases_are_not_retired_before_the_analysis_passes(cloud):
    deploy(cloud, "a")
    deploy(cloud, "b")
    a_insts = {n for n, i in cloud.instances.items() if i.release == "a"}
    seen = []

    def hook(step):
        if step.kind == "retire":
            seen.append(("retire", cloud.fips[ENV].history[-1].detail))
        degrade_green(cloud, "fail", 0.2)(step)
    with pytest.raises(AnalysisFailed):
        deploy(cloud, "c", analysis_window=3, before_step=hook)
    assert not seen, "no retire step ran: the analysis failed first"
    assert live(cloud) == "b" and a_insts <= set(cloud.instances)
    assert cloud.fips[ENV].state.previous == "a"  # the rollback target survives too

    def record(step):
        if step.kind == "retire":
            seen.append(("retire", cloud.fips[ENV].history[-1].detail))
    deploy(cloud, "c", analysis_window=1, before_step=record)
    assert seen and seen[0][1].startswith("analysis passed"), seen
    assert not a_insts & set(cloud.instances)  # retired after the analysis passed


def test_first_deploy_breach_is_reported_but_left_live(cloud):
    with pytest.raises(AnalysisFailed, match="stays live") as err:
        deploy(cloud, "a", analysis_window=2, before_step=degrade_green(cloud, "fail", 0.0))
    assert not err.value.rolled_back and err.value.verdict.baseline is None
    assert live(cloud) == "a" and cloud.fips[ENV].state.lock is None
    assert cloud.fips[ENV].history[-1].action == "analysis_failed"


def test_a_signal_during_the_analysis_undoes_the_switch(cloud, monkeypatch):
    deploy(cloud, "a")
    before = set(cloud.instances)

    def interrupted(*a, **kw):
        raise Cancelled(15)
    monkeypatch.setattr(analysis, "watch", interrupted)
    with pytest.raises(Cancelled):
        deploy(cloud, "b", analysis_window=5)
    assert live(cloud) == "a" and set(cloud.instances) == before
    assert cloud.fips[ENV].state.lock is None
    assert [e.action for e in cloud.fips[ENV].history] == ["deploy"]  # the undone run: none


def test_cli_exit_8_with_the_figures_in_json(cloud):
    out, err = io.StringIO(), io.StringIO()

    def conf(ctx):
        ctx.port = cloud.port
    assert cli.run(["deploy", "--env", ENV, "--release", "a", "--analysis-window", "0"],
                   cloud=cloud, stdout=io.StringIO(), stderr=io.StringIO(),
                   configure=conf) == 0

    def conf_bad(ctx):
        conf(ctx)
        ctx.before_step = degrade_green(cloud, "fail", 0.0)
    code = cli.run(["deploy", "--env", ENV, "--release", "b", "--analysis-window", "2",
                    "--json"], cloud=cloud, stdout=out, stderr=err, configure=conf_bad)
    assert code == cli.ExitCode.ANALYSIS_FAILED == 8, err.getvalue()
    res = json.loads(out.getvalue())
    assert res["type"] == "AnalysisFailed" and res["rolled_back"] is True
    assert res["analysis"]["outcome"] == "failed" and res["analysis"]["now"]["failed"] > 0
    assert live(cloud) == "a"
    out = io.StringIO()
    assert cli.run(["history", "--env", ENV], cloud=cloud, stdout=out,
                   stderr=io.StringIO()) == 0
    assert "analysis_failed" in out.getvalue().splitlines()[-1]


@pytest.mark.parametrize("args", [["--analysis-window", "-1"], ["--max-error-rate", "2"],
                                  ["--max-p99-ratio", "0"], ["--p99-slack-ms", "-5"],
                                  ["--notify", "ftp://x"]])
def test_bad_analysis_and_notify_flags_are_usage_errors(cloud, args):
    err = io.StringIO()
    code = cli.run(["deploy", "--env", ENV, "--release", "a", *args], cloud=cloud,
                   stdout=io.StringIO(), stderr=err)
    assert code == 2 and err.getvalue().startswith("error:") and not cloud.calls


def test_a_bad_window_in_the_environment_is_a_usage_error(cloud, monkeypatch):
    monkeypatch.setenv(analysis.WINDOW_ENV, "soon")
    err = io.StringIO()
    code = cli.run(["deploy", "--env", ENV, "--release", "a"], cloud=cloud,
                   stdout=io.StringIO(), stderr=err)
    assert code == 2 and "MODELSERVE_ANALYSIS_WINDOW" in err.getvalue() and not cloud.calls


def test_the_window_defaults_to_30_s_and_the_environment_overrides_it(monkeypatch):
    import argparse
    args = argparse.Namespace(analysis_window=None, notify=[])
    monkeypatch.delenv(analysis.WINDOW_ENV)
    cli._resolve_env_args(args)
    assert args.analysis_window == 30.0
    monkeypatch.setenv(analysis.WINDOW_ENV, "2")
    args.analysis_window = None
    cli._resolve_env_args(args)
    assert args.analysis_window == 2.0
