"""``python -m rollout`` on the in-memory cloud: one test per exit code (invariant I10),
arguments validated before any cloud call (I9), and signals (I3) in real child processes
started with SIGINT ignored, paused mid-deploy by the contract's test hook."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from rollout import cli
from rollout.clouds.base import BUILDING, Lock
from rollout.context import HOOK_DIR_ENV, PAUSE_ENV, default_holder, utcnow
from rollout.errors import AuthError, CloudError, RolloutError, TransientCloudError
from tests.unit.rollout._cli_driver import releases
from tests.unit.rollout.fakecloud import FakeCloud, free_port

ROOT = Path(__file__).resolve().parents[3]
ENV = "dev"


@pytest.fixture
def cloud():
    c = FakeCloud(releases(), port=free_port())
    yield c
    c.close()


def nosleep(ctx):
    ctx.sleep = lambda s: None


def run(cloud, *args, configure=nosleep):
    out, err = io.StringIO(), io.StringIO()

    def conf(ctx):
        ctx.port = cloud.port
        configure(ctx)
    code = cli.run(list(args), cloud=cloud, stdout=out, stderr=err, configure=conf)
    return code, out.getvalue(), err.getvalue()


def deploy(cloud, release, *extra, configure=nosleep):
    return run(cloud, "deploy", "--env", ENV, "--release", release, "--no-probe", *extra,
               configure=configure)


def live(cloud):
    fip = cloud.fips.get(ENV)
    inst = next((i for i in cloud.instances.values() if fip and i.port == fip.target), None)
    return inst.release if inst else None


def test_exit_0_ok(cloud):
    code, _, err = deploy(cloud, "a")
    assert code == cli.ExitCode.OK == 0, err
    assert live(cloud) == "a" and cloud.fips[ENV].state.lock is None


def test_exit_1_other_error(cloud):
    def boom(ctx):
        nosleep(ctx)
        ctx.before_step = lambda step: (_ for _ in ()).throw(RolloutError("boom"))
    code, _, err = deploy(cloud, "a", configure=boom)
    assert code == cli.ExitCode.ERROR == 1 and "boom" in err
    assert cloud.fips[ENV].state.lock is None and not cloud.instances


@pytest.mark.parametrize("args", [
    ["deploy", "--workers", "-1"], ["deploy", "--keep", "0"], ["deploy", "--keep", "1"],
    ["deploy", "--boot-timeout", "0"], ["deploy", "--health-timeout", "-3"],
    ["deploy", "--tolerance", "2"], ["deploy", "--min-accuracy", "nan"],
    ["deploy", "--workers", "two"], ["plan", "--keep", "0"], ["cleanup", "--keep", "1"],
    ["deploy", "--env", "Bad_Env"], ["deploy", "--release", "../x"], ["destroy"],
    ["nosuchcommand"],
], ids=lambda a: " ".join(a))
def test_exit_2_usage_touches_nothing(cloud, args):
    assert deploy(cloud, "a")[0] == 0
    rev, calls = cloud.fips[ENV].revision, len(cloud.calls)
    code, out, err = run(cloud, *args)
    assert code == cli.ExitCode.USAGE == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert len(cloud.calls) == calls, "no cloud call before the arguments are valid"
    assert cloud.fips[ENV].revision == rev and cloud.fips[ENV].state.lock is None


@pytest.mark.parametrize("args", [["--release", "nope"], ["--release", "a", "--min-accuracy",
                                                           "0.9"]],
                         ids=["unknown release", "quality floor"])
def test_exit_3_refused_allocates_nothing(cloud, args):
    code, _, err = run(cloud, "deploy", "--env", ENV, "--no-probe", *args)
    assert code == cli.ExitCode.PLAN == 3, err
    assert cloud.floating_ips(ENV) == [] and not cloud.instances
    assert "create_floating_ip" not in cloud.calls and "update_floating_ip" not in cloud.calls


def test_exit_3_refused_on_an_existing_env_changes_nothing(cloud):
    assert deploy(cloud, "a")[0] == 0
    rev = cloud.fips[ENV].revision
    code, _, _ = deploy(cloud, "nope")
    assert code == 3 and cloud.fips[ENV].revision == rev


def test_exit_4_locked_by_a_live_holder(cloud):
    assert deploy(cloud, "a")[0] == 0
    fip = cloud.fips[ENV]
    lk = Lock(default_holder(), utcnow(), "other1", utcnow(-3600))  # expired, but alive
    cloud.fips[ENV] = replace(fip, state=replace(fip.state, lock=lk))
    for args in (["deploy", "--env", ENV, "--release", "b", "--no-probe"],
                 ["cleanup", "--env", ENV, "--break-lock"],
                 ["destroy", "--env", ENV, "--yes", "--break-lock"]):
        code, _, err = run(cloud, *args)
        assert code == cli.ExitCode.LOCKED == 4, err
        assert "locked by" in err
    assert cloud.fips[ENV].state.lock == lk and live(cloud) == "a"


def test_exit_5_health_gate(cloud):
    assert deploy(cloud, "a")[0] == 0
    cloud.unready_releases.add("b")
    code, _, err = deploy(cloud, "b", "--health-timeout", "5")
    assert code == cli.ExitCode.UNHEALTHY == 5 and "did not become healthy" in err
    assert live(cloud) == "a" and cloud.fips[ENV].state.lock is None
    assert {i.release for i in cloud.instances.values()} == {"a"}


def test_exit_6_permanent_cloud_error(cloud):
    cloud.fail["create_instance"] = [CloudError("quota exceeded")]
    code, _, err = deploy(cloud, "a")
    assert code == cli.ExitCode.CLOUD == 6 and "quota" in err
    assert cloud.fips[ENV].state.lock is None


def test_exit_6_auth_error_is_never_retried(cloud):
    cloud.fail["list_releases"] = [AuthError("HTTP 401: wrong password")] * 5
    code, _, err = deploy(cloud, "a")
    assert code == 6 and "401" in err
    assert cloud.calls.count("list_releases") == 1


def test_exit_6_transient_errors_beyond_the_budget(cloud):
    cloud.fail["list_releases"] = [TransientCloudError("503")] * 1000
    code, _, err = deploy(cloud, "a")
    assert code == cli.ExitCode.CLOUD == 6, err
    assert "gave up" in err and "cloud-call" in err
    assert 1 < cloud.calls.count("list_releases") < 1000
    assert cloud.floating_ips(ENV) == []


def test_exit_7_wait_timeout(cloud):
    orig = cloud.get_instance
    cloud.get_instance = lambda i: replace(orig(i), status=BUILDING)
    code, _, err = deploy(cloud, "a", "--boot-timeout", "5")
    assert code == cli.ExitCode.TIMEOUT == 7 and "gave up" in err
    assert not cloud.instances and cloud.fips[ENV].state.lock is None


def test_first_error_is_reported_and_undo_errors_beside_it(cloud):
    assert deploy(cloud, "a")[0] == 0
    cloud.unready_releases.add("b")
    cloud.fail["delete_instance"] = [CloudError("delete refused")] * 100
    orig = cloud.update_floating_ip

    def update(fip, *, target, state, if_revision):
        if state.lock is None:
            raise CloudError("unlock refused")
        return orig(fip, target=target, state=state, if_revision=if_revision)
    cloud.update_floating_ip = update
    code, _, err = deploy(cloud, "b", "--health-timeout", "2")
    assert code == 5, err
    text = " ".join(err.split())
    first = text.index("did not become healthy")
    assert first < text.index("also: could not delete") < text.index("also: releasing the lock")
    assert "--break-lock" in text


# -- signals (I3), in child processes -------------------------------------------------------
def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("kind", ["launch_front", "health_gate", "switch"])
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                      (signal.SIGHUP, 129)], ids=["INT", "TERM", "HUP"])
def test_a_signal_mid_deploy_undoes_and_exits_128_plus_signal(tmp_path, kind, sig, code):
    state = tmp_path / "state.json"
    env = {**os.environ, PAUSE_ENV: kind, HOOK_DIR_ENV: str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.rollout._cli_driver", str(state), "deploy", "--env",
         ENV, "--release", "b", "--no-probe"], cwd=ROOT, env=env, preexec_fn=_ignore_sigint,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reached = tmp_path / f"{kind}.reached"
        for _ in range(1200):  # the hook announces the pause; wait for it (bounded)
            if reached.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert reached.exists(), proc.communicate(timeout=30)
        assert int(reached.read_text()) == proc.pid
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert f"interrupted by {signal.Signals(sig).name}" in err
    st = json.loads(state.read_text())
    before, after = st["before"], st["after"]
    assert after["live"] == "a" and after["target"] == before["target"]
    assert after["instances"] == before["instances"], "this run's instances are deleted"
    assert after["lock"] is None and after["fips"] == 1


def test_the_hook_releases_the_pause_when_go_appears(tmp_path):
    state = tmp_path / "state.json"
    (tmp_path / "switch.go").write_text("")
    env = {**os.environ, PAUSE_ENV: "switch", HOOK_DIR_ENV: str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.unit.rollout._cli_driver", str(state), "deploy", "--env",
         ENV, "--release", "b", "--no-probe"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120, preexec_fn=_ignore_sigint)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "switch.reached").read_text().isdigit()
    st = json.loads(state.read_text())
    assert st["after"]["live"] == "b" and st["after"]["lock"] is None


def _project_version() -> str:
    """app/__init__.py's __version__: the one source (pyproject's dynamic version reads it)."""
    import re
    text = (ROOT / "app" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


def test_version_names_the_project_version_and_touches_no_cloud(cloud):
    code, out, err = run(cloud, "--version")
    assert code == 0, err
    assert out == f"modelserve-rollout {_project_version()}\n" and err == ""
    assert not cloud.instances and not cloud.fips


def test_python_m_rollout_version_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "rollout", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"modelserve-rollout {_project_version()}\n"


@pytest.mark.parametrize("installed_here", [True, False])
def test_version_from_metadata_only_when_this_code_is_the_installed_one(monkeypatch,
                                                                        installed_here):
    """Installed, the distribution's metadata names the version; an installed distribution
    that is not this code (an older wheel in the venv) does not lend it to the working tree."""
    from importlib import metadata

    site = Path(cli.__file__).resolve().parents[1] if installed_here else Path("/nonexistent")

    class Dist:
        version = "9.9.9"

        def locate_file(self, path):
            return site / path
    monkeypatch.setattr(metadata, "distribution", lambda name: Dist())
    assert cli.version() == ("9.9.9" if installed_here else _project_version())


@pytest.mark.parametrize("key, value", [("OS_CLOUD", "production"),
                                        ("OS_AUTH_URL", "https://keystone.example:5000/v3")])
def test_destroy_yes_never_takes_its_cloud_from_the_environment(cloud, monkeypatch, key,
                                                                 value):
    """An openrc sourced for other work: `destroy --yes` without --cloud names the cloud the
    environment chose, refuses (2) and touches nothing; with --cloud it goes on."""
    monkeypatch.setenv(key, value)
    assert deploy(cloud, "a")[0] == 0
    before = dict(cloud.instances)
    code, _, err = run(cloud, "destroy", "--env", ENV, "--yes")
    assert code == cli.ExitCode.USAGE, err
    assert f"{key}={value}" in err and "--cloud" in err and f"env {ENV}" in err
    assert cloud.instances == before and live(cloud) == "a"
    code, _, err = run(cloud, "destroy", "--env", ENV, "--yes", "--cloud", "openstack")
    assert code == 0, err
    assert not cloud.instances


@pytest.mark.parametrize("command", ["cleanup", "abort"])
def test_cleanup_and_abort_ask_for_the_env_typed_back(cloud, monkeypatch, command):
    """Without --cloud and with OS_CLOUD set, a destructive command asks for the env's name:
    a wrong answer or none (no terminal) refuses and touches nothing."""
    monkeypatch.setenv("OS_CLOUD", "production")
    assert deploy(cloud, "a")[0] == 0
    before = dict(cloud.instances)
    for answer in ("", "prod\n"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(answer))
        code, _, err = run(cloud, command, "--env", ENV)
        assert code == cli.ExitCode.USAGE, err
        assert "OS_CLOUD=production" in err and "not confirmed" in err
        assert cloud.instances == before
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{ENV}\n"))
    code, _, err = run(cloud, command, "--env", ENV)
    assert "not confirmed" not in err and "Type the env's name" in err
    assert code != cli.ExitCode.USAGE, err  # confirmed: the command itself ran


def test_without_os_variables_destructive_commands_ask_nothing(cloud, monkeypatch):
    for key in ("OS_CLOUD", "OS_AUTH_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert deploy(cloud, "a")[0] == 0
    code, _, err = run(cloud, "cleanup", "--env", ENV)
    assert code == 0 and "Type the env" not in err, err
