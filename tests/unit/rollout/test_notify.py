"""Deploy notifications (CloudEvents 1.0, structured mode) to a real local HTTP receiver."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rollout import cli, executor, notify
from rollout.clouds.base import Release
from rollout.errors import AnalysisFailed, HealthCheckFailed
from rollout.planner import DeployRequest, RollbackRequest
from tests.unit.rollout.fakecloud import FakeCloud, free_port

ENV = "dev"


class Receiver:
    """A real HTTP server on loopback recording every POST; ``mode``: ok | 500 | hang."""

    def __init__(self, mode: str = "ok"):
        self.mode, self.got, self.release = mode, [], threading.Event()
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                rec.got.append((self.path, self.headers.get("Content-Type"),
                                json.loads(self.rfile.read(n))))
                if rec.mode == "hang":
                    rec.release.wait(30)
                code = 500 if rec.mode == "500" else 202
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.srv.server_address[1]}/hook/s3cr3t-token"

    def kinds(self) -> list[str]:
        out = []
        for _, _, body in self.got:
            kind = body["type"].rsplit(".", 1)[-1]
            if not out or out[-1] != kind or self.mode == "ok":
                out.append(kind)
        return out

    def close(self) -> None:
        self.release.set()
        self.srv.shutdown()
        self.srv.server_close()


@pytest.fixture
def cloud():
    c = FakeCloud([Release(f"img-{r}", f"modelserve-{r}", r, f"sha-{r}", 0.78,
                           built_at=f"2026-01-0{n}") for n, r in enumerate("ab", 1)],
                  port=free_port())
    yield c
    c.close()


@pytest.fixture
def receiver():
    made = []

    def make(mode="ok"):
        r = Receiver(mode)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


def run_deploy(cloud, release, urls, **kw):
    ctx = executor.Context(cloud=cloud, env=ENV, sleep=lambda s: None, port=cloud.port, **kw)
    ctx.notifier = notify.Notifier(urls, ENV)
    try:
        return executor.deploy(ctx, DeployRequest(ENV, ctx.deploy_id, release=release))
    finally:
        ctx.notifier.close()


def test_a_deploy_delivers_its_events_in_order_as_cloudevents(cloud, receiver):
    run_deploy(cloud, "a", [])
    rec = receiver()
    res = run_deploy(cloud, "b", [rec.url], analysis_window=1)
    assert rec.kinds() == ["started", "gated", "switched", "analysis_passed"]
    ids = set()
    for path, ctype, ev in rec.got:
        assert path == "/hook/s3cr3t-token"
        assert ctype.startswith("application/cloudevents+json")
        assert ev["specversion"] == "1.0" and ev["source"] == f"modelserve-rollout/{ENV}"
        assert ev["type"].startswith("io.modelserve.rollout.")
        assert ev["datacontenttype"] == "application/json" and ev["time"].endswith("Z")
        ids.add(ev["id"])
        d = ev["data"]
        assert (d["env"], d["release"], d["from_release"], d["deploy_id"]) == (
            ENV, "b", "a", res["deploy_id"])
        assert "reason" in d and "timings" in d["figures"]
    assert len(ids) == len(rec.got), "every event has its own id"
    gated = rec.got[1][2]["data"]["figures"]["timings"]
    assert "health_gate" in gated
    passed = rec.got[3][2]["data"]
    assert passed["figures"]["analysis"]["outcome"] == "passed"
    assert passed["figures"]["analysis"]["baseline"]["requests"] > 0


def test_a_receiver_answering_500_is_retried_and_never_fails_the_deploy(cloud, receiver):
    rec = receiver("500")
    run_deploy(cloud, "a", [rec.url])
    assert cloud.fips[ENV].state.lock is None
    firsts = [body["id"] for _, _, body in rec.got if body["type"].endswith(".started")]
    assert len(firsts) >= 2 and len(set(firsts)) == 1, "the same event, retried"
    assert [k for k in rec.kinds() if k != "started"][:2] == ["gated", "switched"]


def test_a_hanging_receiver_never_holds_the_deploy(cloud, receiver):
    """The deploy and the notifier's close() both return while the receiver still holds
    the first request: delivery runs beside the run, and close() is bounded (BUDGET_S)."""
    rec = receiver("hang")
    res = run_deploy(cloud, "a", [rec.url])
    assert res["release"] == "a" and not rec.release.is_set()
    assert rec.got and rec.got[0][2]["type"].endswith(".started")


def test_an_analysis_failure_delivers_analysis_failed_and_rolled_back(cloud, receiver):
    run_deploy(cloud, "a", [])
    rec = receiver()

    def degrade(step):
        if step.kind == "verify":
            green = next(i for i in cloud.instances.values() if i.release == "b")
            cloud.apps[green.id].degrade("fail", 0.0)
    with pytest.raises(AnalysisFailed):
        run_deploy(cloud, "b", [rec.url], analysis_window=2, before_step=degrade)
    assert rec.kinds() == ["started", "gated", "switched", "analysis_failed", "rolled_back"]
    failed = rec.got[3][2]["data"]
    assert "error rate" in failed["reason"]
    assert failed["figures"]["analysis"]["now"]["failed"] > 0


def test_a_failed_deploy_and_a_rollback_are_notified(cloud, receiver):
    run_deploy(cloud, "a", [])
    rec = receiver()
    cloud.unready_releases.add("b")
    with pytest.raises(HealthCheckFailed):
        run_deploy(cloud, "b", [rec.url], health_timeout=1)
    assert rec.kinds() == ["started", "failed"]
    assert "did not become healthy" in rec.got[-1][2]["data"]["reason"]
    cloud.unready_releases.clear()
    run_deploy(cloud, "b", [])
    rec2 = receiver()
    ctx = executor.Context(cloud=cloud, env=ENV, sleep=lambda s: None, port=cloud.port)
    ctx.notifier = notify.Notifier([rec2.url], ENV)
    executor.rollback(ctx, RollbackRequest(ENV, ctx.deploy_id))
    ctx.notifier.close()
    assert rec2.kinds() == ["started", "gated", "rolled_back"]
    assert rec2.got[-1][2]["data"]["release"] == "a"


def test_the_cli_reads_notify_urls_from_flags_and_the_environment(cloud, receiver,
                                                                   monkeypatch):
    r1, r2 = receiver(), receiver()
    monkeypatch.setenv(notify.NOTIFY_ENV, f" {r2.url} ,")
    err = io.StringIO()

    def conf(ctx):
        ctx.port = cloud.port
    code = cli.run(["deploy", "--env", ENV, "--release", "a", "--notify", r1.url],
                   cloud=cloud, stdout=io.StringIO(), stderr=err, configure=conf)
    assert code == 0, err.getvalue()
    assert r1.kinds() == r2.kinds() == ["started", "gated", "switched"]
    assert "s3cr3t" not in err.getvalue()


def test_url_helpers():
    assert notify.urls_from_env("http://a/x, http://b/y\nhttps://c") == [
        "http://a/x", "http://b/y", "https://c"]
    assert notify.urls_from_env("") == []
    assert notify.redact_url("https://hooks.example:8443/T0/secret?k=v") == \
        "https://hooks.example:8443"
    assert notify.valid_url("http://x/") and not notify.valid_url("ftp://x/") \
        and not notify.valid_url("http://")
