"""The model-diff gate: the pure figures (and hypothesis properties), the sample file, the
chunked HTTP client against a real loopback server, the executor's gate on the in-memory
cloud (whose fronts answer real HTTP; a release's probability is set per release), and the
CLI (bad input before any cloud call, exit 3, --force, --json, history, plan)."""

from __future__ import annotations

import io
import json
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rollout import cli, diff, executor, retry
from rollout.clouds.base import Release
from rollout.diff import Answer, PredictError, SampleError, compare, parse_sample
from rollout.errors import DiffRefused, HealthCheckFailed
from rollout.planner import DeployRequest
from tests.unit.rollout.fakecloud import FakeCloud, free_port, serve

ENV = "dev"
ROW = {"npreg": 1, "glu": 89, "bp": 66, "skin": 23, "bmi": 28.1, "ped": 0.167, "age": 21}


# -- the figures (pure) ----------------------------------------------------------------------
def test_figures_of_a_known_comparison():
    blue = [Answer(0.1, 0), Answer(0.6, 1), Answer(0.4, 0), Answer(0.9, 1)]
    green = [Answer(0.1, 0), Answer(0.3, 0), Answer(0.7, 1), Answer(0.8, 1)]
    fig = compare(blue, green, ["holdout", "holdout", "sample", "sample"])
    assert (fig.rows, fig.flipped) == (4, 2)
    assert fig.flip_rate == 0.5 and fig.agreement == 0.5
    assert fig.max_abs_change == pytest.approx(0.3)
    assert fig.mean_abs_change == pytest.approx((0 + 0.3 + 0.3 + 0.1) / 4)
    assert [(f["index"], f["source"]) for f in fig.flips] == [(1, "holdout"), (0, "sample")]
    assert fig.flips[0]["blue"] == {"probability": 0.6, "label": 1}
    assert fig.flips[0]["green"] == {"probability": 0.3, "label": 0}
    d = fig.to_dict()
    assert d["sources"] == {"holdout": 2, "sample": 2} and d["flip_rate"] == 0.5
    assert d["agreement"] == 0.5 and len(d["flips"]) == 2
    assert "agreement 50.00%" in fig.line() and "2 flipped" in fig.line()


def test_at_most_ten_flipped_rows_are_kept_but_all_are_counted():
    fig = compare([Answer(0.2, 0)] * 30, [Answer(0.8, 1)] * 30, ["holdout"] * 30)
    assert fig.flipped == 30 and len(fig.flips) == diff.MAX_FLIPS_SHOWN == 10
    assert fig.refused(0.25) and not fig.refused(1.0)


def test_compare_refuses_lists_of_different_lengths():
    with pytest.raises(ValueError):
        compare([Answer(0.1, 0)], [], ["holdout"])


def test_the_threshold_is_strict_and_no_rows_never_refuse():
    fig = compare([Answer(0.2, 0)] * 4, [Answer(0.8, 1)] + [Answer(0.2, 0)] * 3,
                  ["holdout"] * 4)
    assert fig.flip_rate == 0.25
    assert not fig.refused(0.25) and fig.refused(0.24)
    empty = compare([], [], [])
    assert empty.flip_rate == 0.0 and empty.agreement == 1.0 and not empty.refused(0.0)


def test_history_detail_is_short_and_has_no_separator():
    fig = compare([Answer(0.25, 0)] * 332, [Answer(0.75, 1)] * 332, ["holdout"] * 332)
    detail = fig.detail()
    assert ";" not in detail and len(detail) < 80
    assert detail == "diff flipped=332/332 (100.00%) dp=0.500/0.500"


answers = st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), max_size=300)


@given(answers, st.floats(0, 1))
def test_figures_properties(pairs, threshold):
    blue = [Answer(b, int(b >= 0.5)) for b, _ in pairs]
    green = [Answer(g, int(g >= 0.5)) for _, g in pairs]
    fig = compare(blue, green, ["holdout"] * len(pairs))
    flipped = sum(1 for b, g in zip(blue, green, strict=True) if b.label != g.label)
    assert fig.rows == len(pairs) and fig.flipped == flipped
    assert 0.0 <= fig.flip_rate <= 1.0 and fig.agreement == pytest.approx(1 - fig.flip_rate)
    assert 0.0 <= fig.mean_abs_change <= fig.max_abs_change + 1e-12 <= 1.0 + 1e-12
    assert fig.refused(threshold) == (fig.flip_rate > threshold)
    assert len(fig.flips) == min(flipped, 10)
    json.dumps(fig.to_dict())  # JSON-ready


@given(st.integers(0, 2000), st.integers(1, 300))
def test_chunks_cover_every_row_in_order_within_the_size(n, size):
    rows = [{"i": i} for i in range(n)]
    parts = list(diff.chunks(rows, size))
    assert all(1 <= len(p) <= size for p in parts)
    assert [r for p in parts for r in p] == rows


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError):
        list(diff.chunks([ROW], 0))


# -- the sample file ---------------------------------------------------------------------------
def test_sample_lines_are_request_bodies_or_instances():
    text = (json.dumps({"instances": [ROW, ROW]}) + "\n\n" + json.dumps(ROW) + "\n"
            + json.dumps({"instances": []}) + "\n")
    assert parse_sample(text) == [ROW, ROW, ROW]


@pytest.mark.parametrize("text, why", [
    ("{nope\n", "line 1: not JSON"),
    (json.dumps(ROW) + "\n[1, 2]\n", "line 2: a list"),
    ('"text"\n', "line 1: a str"),
    ('{"instances": {"a": 1}}\n', "line 1: \"instances\" is not a list"),
    ('{"instances": [{"a": 1}, 3]}\n', "line 1: instances[1] is a int"),
    ("\n  \n", "no rows"),
    ((json.dumps(ROW) + "\n") * 4, "more than 3 rows"),
])
def test_bad_sample_text_is_refused_naming_the_line(text, why):
    with pytest.raises(SampleError, match=r"^s\.jsonl" if "rows" in why else "s.jsonl") as err:
        parse_sample(text, max_rows=3, name="s.jsonl")
    assert why in str(err.value)


def test_sample_file_limits_and_read_errors(tmp_path):
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"instances": [ROW] * 10_000}) + "\n")
    assert len(diff.load_sample(str(ok))) == diff.MAX_SAMPLE_ROWS == 10_000
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"instances": [ROW] * 10_000}) + "\n" + json.dumps(ROW) + "\n")
    with pytest.raises(SampleError, match="more than 10000 rows"):
        diff.load_sample(str(big))
    with pytest.raises(SampleError, match="cannot read"):
        diff.load_sample(str(tmp_path / "missing.jsonl"))
    with pytest.raises(SampleError, match="cannot read"):
        diff.load_sample(str(tmp_path))  # a directory
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(SampleError, match="not UTF-8"):
        diff.load_sample(str(binary))


def test_the_tools_bundle_holdout_is_the_apps_holdout_endpoint_rows():
    from app.bundle import load_bundle

    bundle = load_bundle(verify=False)
    rows = diff.bundle_holdout()
    assert len(rows) == len(bundle.metadata["holdout_sample"]) > 100
    assert rows[0] == {n: bundle.metadata["holdout_sample"][0]["features"][n]
                       for n in bundle.feature_names}
    assert diff.bundle_holdout(diff.Path("/nonexistent/metadata.json")) == []


# -- the HTTP client against a real loopback server -----------------------------------------------
class Front:
    """A loopback HTTP front answering predictions row by row (probability from ``prob``)
    and recording each request's row count; ``status`` != 200 answers that status."""

    def __init__(self, prob=lambda row: 0.25, status=200, short=False, busy=0):
        self.prob, self.status, self.short, self.busy = prob, status, short, busy
        self.sizes: list[int] = []
        self.holdout: list[dict] | None = None
        self.port = free_port()
        self.srv = serve("127.0.0.1", self.port, self.route, with_body=True)

    def route(self, method, path, body=b""):
        if path == diff.HOLDOUT_PATH and method == "GET":
            return (404, {"error": "not found"}) if self.holdout is None else (
                200, {"rows": self.holdout, "version": "1"})
        rows = json.loads(body)["instances"]
        self.sizes.append(len(rows))
        if self.busy:  # the first `busy` requests: 503, as a front whose workers warm up
            self.busy -= 1
            return 503, {"error": {"type": "unavailable", "message": "retry later"}}
        if self.status != 200:
            return self.status, {"error": "nope"}
        preds = [{"probability": self.prob(r), "label": int(self.prob(r) >= 0.5)} for r in rows]
        return 200, {"predictions": preds[:-1] if self.short else preds}

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def front():
    fronts = []

    def make(**kw):
        fronts.append(Front(**kw))
        return fronts[-1]
    yield make
    for f in fronts:
        f.close()


def test_predict_sends_chunks_of_at_most_256_rows_and_keeps_the_order(front):
    f = front(prob=lambda row: row["glu"] / 1000)
    rows = [dict(ROW, glu=i) for i in range(600)]
    got = diff.predict("127.0.0.1", f.port, rows)
    assert f.sizes == [256, 256, 88]
    assert [a.probability for a in got] == [i / 1000 for i in range(600)]
    assert diff.predict("127.0.0.1", f.port, []) == [] and f.sizes == [256, 256, 88]


@pytest.mark.parametrize("kw, match", [({"status": 500}, "HTTP 500"),
                                       ({"status": 400}, "HTTP 400"),
                                       ({"short": True}, "answered 1 predictions for 2 rows"),
                                       ({"prob": lambda r: 1.5}, "malformed")])
def test_predict_failures_are_predict_errors(front, kw, match):
    f = front(**kw)
    with pytest.raises(PredictError, match=match) as err:
        diff.predict("127.0.0.1", f.port, [ROW, ROW])
    assert err.value.status == kw.get("status")


def test_a_busy_front_is_asked_again_and_a_front_busy_for_good_is_an_error(front):
    """503 means retry later (Retry-After): a front whose workers warm up answers the same
    rows a moment later; one that stays busy past the diff-predict budget is a failure."""
    f = front(busy=2, prob=lambda row: row["glu"] / 1000)
    rows = [dict(ROW, glu=i) for i in range(3)]
    got = diff.predict("127.0.0.1", f.port, rows)
    assert [a.probability for a in got] == [0.0, 0.001, 0.002] and f.sizes == [3, 3, 3]
    assert "diff-predict" in retry.POLICIES
    stuck = front(status=200, busy=10**6)
    with pytest.raises(PredictError, match="HTTP 503") as err:
        diff.predict("127.0.0.1", stuck.port, [ROW],
                     busy=retry.DIFF_PREDICT.with_budget(1.5))
    assert err.value.status == 503 and len(stuck.sizes) >= 2


def test_a_dead_or_silent_front_is_a_bounded_predict_error():
    with pytest.raises(PredictError, match="ConnectionError"):
        diff.predict("127.0.0.1", free_port(), [ROW])
    import socket

    s = socket.socket()  # accepts connections (backlog) but never answers
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    try:
        with pytest.raises(PredictError, match="Timeout"):
            diff.predict("127.0.0.1", s.getsockname()[1], [ROW], timeout=(0.5, 0.5))
    finally:
        s.close()


def test_fetch_holdout_404_is_none_and_rows_are_returned(front):
    f = front()
    assert diff.fetch_holdout("127.0.0.1", f.port) is None
    f.holdout = [ROW, ROW]
    assert diff.fetch_holdout("127.0.0.1", f.port) == [ROW, ROW]
    with pytest.raises(PredictError):
        diff.fetch_holdout("127.0.0.1", free_port())


# -- the executor's gate on the in-memory cloud ------------------------------------------------
@pytest.fixture
def cloud():
    c = FakeCloud([Release(f"img-{r}", f"modelserve-{r}", r, f"sha-{r}", 0.78,
                           built_at=f"2026-01-0{n}", provenance="release")
                   for n, r in enumerate("abc", 1)], port=free_port())
    yield c
    c.close()


class Events:
    """A stand-in notifier (the real one is tested in test_notify.py): records each event."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []
        self.mu = threading.Lock()

    def emit(self, event, data):
        with self.mu:
            self.events.append((event, json.loads(json.dumps(data))))

    def close(self):
        pass


def deploy(cloud, release, before_step=None, **req):
    ctx = executor.Context(cloud=cloud, env=ENV, sleep=lambda s: None, port=cloud.port,
                           probe=False, analysis_window=0, before_step=before_step)
    ctx.notifier = Events()
    res = executor.deploy(ctx, DeployRequest(ENV, ctx.deploy_id, release=release, **req))
    return res, ctx.notifier.events


def live(cloud):
    fip = cloud.fips.get(ENV)
    inst = next((i for i in cloud.instances.values() if fip and i.port == fip.target), None)
    return inst.release if inst else None


def app_of(cloud, release):
    inst = next(i for i in cloud.instances.values() if i.release == release and i.role == "front")
    return cloud.apps[inst.id]


def on_diff_gate(fn):
    def hook(step):
        if step.kind == "diff_gate":
            fn(step)
    return hook


def test_first_deploy_has_no_diff_gate(cloud):
    res, _ = deploy(cloud, "a")
    assert res["diff"] is None and "diff_gate" not in [s["kind"] for s in res["steps"]]
    assert any("model-diff gate skipped: nothing is live" in n for n in res["notes"])


def test_same_answers_pass_with_figures_in_the_result_the_gated_event_and_history(cloud):
    deploy(cloud, "a")
    res, events = deploy(cloud, "b")
    assert live(cloud) == "b"
    d = res["diff"]
    assert d["outcome"] == "passed" and d["rows"] == len(diff.bundle_holdout()) == 332
    assert (d["flipped"], d["agreement"], d["max_abs_change"]) == (0, 1.0, 0.0)
    assert d["holdout_from"] == "the tool's bundle"  # the fake fronts have no holdout route
    kinds = [e for e, _ in events]
    assert kinds.index("gated") < kinds.index("switched")
    gated = dict(events)["gated"]
    assert gated["figures"]["diff"]["rows"] == 332
    last = cloud.fips[ENV].history[-1]
    assert last.action == "deploy" and "diff flipped=0/332" in last.detail


def test_a_release_that_flips_most_labels_is_refused_and_undone(cloud):
    deploy(cloud, "a")
    before = set(cloud.instances)
    history = cloud.fips[ENV].history
    cloud.probabilities["b"] = 0.9  # a's fronts answer 0.3 (label 0): every label flips
    with pytest.raises(DiffRefused, match=r"flip rate 100\.00% > --max-disagreement 0\.25") as e:
        deploy(cloud, "b")
    assert e.value.figures["flipped"] == 332 and e.value.figures["outcome"] == "refused"
    assert len(e.value.figures["flips"]) == 10
    assert live(cloud) == "a" and set(cloud.instances) == before  # green deleted
    fip = cloud.fips[ENV]
    assert fip.state.lock is None and fip.state.live == "a"
    new = fip.history[len(history):]  # only the failure, with the figures
    assert [e.action for e in new] == ["failed"] and "flip rate 100.00%" in new[0].detail


def test_force_overrides_and_the_override_is_recorded(cloud):
    deploy(cloud, "a")
    cloud.probabilities["b"] = 0.9
    res, events = deploy(cloud, "b", force=True)
    assert live(cloud) == "b" and res["diff"]["outcome"] == "overridden"
    assert any("model-diff gate overridden (--force)" in n for n in res["notes"])
    last = cloud.fips[ENV].history[-1]
    assert last.action == "deploy-forced"
    assert "diff flipped=332/332 (100.00%)" in last.detail and "overridden" in last.detail
    assert dict(events)["gated"]["figures"]["diff"]["outcome"] == "overridden"


def test_a_higher_threshold_lets_a_partial_flip_through(cloud):
    deploy(cloud, "a")
    cloud.probabilities["b"] = 0.9
    res, _ = deploy(cloud, "b", max_disagreement=1.0)
    assert live(cloud) == "b" and res["diff"]["flip_rate"] == 1.0
    assert res["diff"]["outcome"] == "passed"


def test_greens_own_holdout_and_the_sample_rows_are_compared(cloud):
    deploy(cloud, "a")

    def serve_holdout(step):
        app_of(cloud, "b").holdout = [ROW] * 5
    res, _ = deploy(cloud, "b", diff_sample=(ROW, ROW, ROW),
                    before_step=on_diff_gate(serve_holdout))
    d = res["diff"]
    assert d["holdout_from"] == "green" and d["rows"] == 8
    assert d["sources"] == {"holdout": 5, "sample": 3}


def test_a_live_front_that_cannot_answer_skips_the_gate_without_blocking(cloud):
    deploy(cloud, "a")
    res, _ = deploy(cloud, "b", before_step=on_diff_gate(
        lambda step: setattr(app_of(cloud, "a"), "predict_fail", 503)))
    assert live(cloud) == "b"
    assert res["diff"]["outcome"] == "skipped" and "HTTP 503" in res["diff"]["reason"]
    assert "diff skipped: the live front" in cloud.fips[ENV].history[-1].detail


def test_a_green_that_cannot_answer_fails_the_gate(cloud):
    deploy(cloud, "a")
    before = set(cloud.instances)
    with pytest.raises(HealthCheckFailed, match="model-diff gate"):
        deploy(cloud, "b", before_step=on_diff_gate(
            lambda step: setattr(app_of(cloud, "b"), "predict_fail", 500)))
    assert live(cloud) == "a" and set(cloud.instances) == before


def test_rollback_has_no_diff_gate(cloud):
    deploy(cloud, "a")
    deploy(cloud, "b")
    ctx = executor.Context(cloud=cloud, env=ENV, sleep=lambda s: None, port=cloud.port,
                           probe=False)
    res = executor.rollback(ctx, executor.RollbackRequest(ENV, ctx.deploy_id))
    assert live(cloud) == "a" and res["diff"] is None
    assert "diff_gate" not in [s["kind"] for s in res["steps"]]


# -- the CLI ---------------------------------------------------------------------------------------
def run(cloud, *args):
    out, err = io.StringIO(), io.StringIO()

    def conf(ctx):
        ctx.port, ctx.sleep = cloud.port, (lambda s: None)
    code = cli.run(list(args), cloud=cloud, stdout=out, stderr=err, configure=conf)
    return code, out.getvalue(), err.getvalue()


def cli_deploy(cloud, release, *extra):
    return run(cloud, "deploy", "--env", ENV, "--release", release, "--no-probe", *extra)


def _files(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROW) + "\n{oops\n")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "big.jsonl").write_text((json.dumps(ROW) + "\n") * 10_001)
    return tmp_path


@pytest.mark.parametrize("args", [
    ["--max-disagreement", "1.5"], ["--max-disagreement", "-0.1"],
    ["--max-disagreement", "nan"], ["--max-disagreement", "lots"],
    ["--diff-sample", "{tmp}/missing.jsonl"], ["--diff-sample", "{tmp}/bad.jsonl"],
    ["--diff-sample", "{tmp}/list.jsonl"], ["--diff-sample", "{tmp}/empty.jsonl"],
    ["--diff-sample", "{tmp}/big.jsonl"], ["--diff-sample", "{tmp}"],
], ids=lambda a: " ".join(a).replace("{tmp}/", ""))
@pytest.mark.parametrize("command", ["deploy", "plan"])
def test_bad_diff_arguments_exit_2_before_any_cloud_call(cloud, tmp_path, args, command):
    assert cli_deploy(cloud, "a")[0] == 0
    d = _files(tmp_path)
    rev, calls = cloud.fips[ENV].revision, len(cloud.calls)
    code, _, err = run(cloud, command, "--env", ENV, "--release", "b",
                       *[a.replace("{tmp}", str(d)) for a in args])
    assert code == cli.ExitCode.USAGE == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "--max-disagreement" in lines[0] or "--diff-sample" in lines[0]
    assert len(cloud.calls) == calls and cloud.fips[ENV].revision == rev


def test_cli_refusal_exits_3_with_the_figures_in_json_then_force_and_history(cloud, tmp_path):
    assert cli_deploy(cloud, "a")[0] == 0
    cloud.probabilities["b"] = 0.9
    sample = tmp_path / "s.jsonl"
    sample.write_text(json.dumps({"instances": [ROW, ROW]}) + "\n" + json.dumps(ROW) + "\n")
    code, out, err = cli_deploy(cloud, "b", "--json", "--diff-sample", str(sample))
    assert code == cli.ExitCode.PLAN == 3, err
    body = json.loads(out)
    assert body["type"] == "DiffRefused" and "--max-disagreement 0.25" in body["error"]
    assert body["diff"]["rows"] == 335 and body["diff"]["sources"] == {"holdout": 332,
                                                                         "sample": 3}
    assert "flip rate 100.00%" in err and live(cloud) == "a"
    assert not [i for i in cloud.instances.values() if i.release == "b"]

    code, out, err = cli_deploy(cloud, "b", "--json", "--force")
    assert code == 0, err
    res = json.loads(out)
    assert res["diff"]["outcome"] == "overridden" and live(cloud) == "b"
    code, out, _ = run(cloud, "history", "--env", ENV, "--json")
    last = json.loads(out)[-1]
    assert last["action"] == "deploy-forced" and "diff flipped=332/332" in last["detail"]
    code, out, _ = run(cloud, "history", "--env", ENV)
    assert "deploy-forced" in out and "diff flipped=332/332 (100.00%)" in out


def test_plan_shows_the_diff_gate_with_its_threshold_and_rows(cloud, tmp_path):
    assert cli_deploy(cloud, "a")[0] == 0
    sample = tmp_path / "s.jsonl"
    sample.write_text((json.dumps(ROW) + "\n") * 4)
    code, out, err = run(cloud, "plan", "--env", ENV, "--release", "b",
                         "--max-disagreement", "0.1", "--diff-sample", str(sample), "--json")
    assert code == 0, err
    step = next(s for s in json.loads(out)["steps"] if s["kind"] == "diff_gate")
    assert step["max_disagreement"] == 0.1 and step["sample_rows"] == 4
    assert step["rows"] == 332 + 4 and step["live_release"] == "a"
    code, out, _ = run(cloud, "plan", "--env", ENV, "--release", "b")
    line = next(ln for ln in out.splitlines() if "diff_gate" in ln)
    assert "max_disagreement=0.25" in line and "rows=332" in line


def test_plan_measures_real_figures_when_the_targets_front_is_warm(cloud):
    assert cli_deploy(cloud, "a")[0] == 0
    cloud.probabilities["b"] = 0.9
    assert cli_deploy(cloud, "b", "--force")[0] == 0
    assert run(cloud, "rollback", "--env", ENV, "--no-probe")[0] == 0  # b stays warm
    assert live(cloud) == "a"
    calls = len(cloud.calls)
    revision = cloud.fips[ENV].revision
    ctx = executor.Context(cloud=cloud, env=ENV, port=cloud.port)  # the CLI's plan, on our port
    res = executor.plan_only(ctx, DeployRequest(ENV, ctx.deploy_id, release="b"))
    step = next(s for s in res["steps"] if s["kind"] == "diff_gate")
    assert step["rows"] == 332 and step["figures"]["flip_rate"] == 1.0
    assert step["figures"]["would_refuse"] is True
    assert step["figures"]["holdout_from"] == "the tool's bundle"
    assert cloud.fips[ENV].revision == revision and live(cloud) == "a"  # read-only
    assert not {"update_floating_ip", "create_instance", "delete_instance"} & set(
        cloud.calls[calls:])
