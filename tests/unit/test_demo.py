"""devtools/demo.py (`make demo`): one line per phase, everything else in the log; a failing
phase shows the log's tail and exits non-zero; a warm run says what it reused.

The phases' commands are stand-in scripts here (real processes, real pipes, a real log file)
that print what the real ones print: the bake's `[bake]` lines are checked against
packer/bake.py's own source below, so a change of wording there fails here. The real phases
run in `make demo` (see the report of issue 12) and in the image/e2e tiers.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOISE = 600  # what apt, mmdebstrap, pip and Packer print on a fresh machine, about


def _demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "devtools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _demo()


def script(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\nset -u\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def noise(n: int, what: str) -> str:
    return f'for i in $(seq {n}); do echo "{what} line $i"; done\n'


COLD_BAKE = (noise(5, "git") +
             'echo "08:00:00 [bake] release g1: git 1234, app 0.1.0" >&2\n'
             'echo "08:00:00 [bake] wheelhouse: pip download of requirements.txt into /x" >&2\n'
             + noise(150, "pip download") +
             'echo "08:00:01 [bake] baking deps layer modelserve-deps-abc (OS packages + venv)" >&2\n'
             + noise(250, "==> lxd.modelserve: apt") +
             'echo "08:00:02 [bake] baking release layer modelserve-g1 on modelserve-deps-abc" >&2\n'
             + noise(100, "==> lxd.modelserve: release") +
             'echo "08:00:03 [bake] bake time 900 s (deps baked in 800 s, release layer 60 s), '
             'image 415 MiB" >&2\n'
             'echo "image modelserve-g1 fingerprint 0123456789abcdef" >&2\n')


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Stand-ins for make, up.sh, bake.py and the venv's python (rollout deploy/status)."""
    calls = tmp_path / "calls"
    images = {"modelserve-base-debian12": "base0123456789"}
    d = tmp_path / "bin"
    d.mkdir()
    make = script(d / "make", f'echo "make $*" >>{calls}\n' + noise(3, "pip install"))
    cold = tmp_path / "cold"  # a fresh machine: packages, daemon, config and base image to make
    up = script(d / "up.sh", f'echo "up.sh SKIP_BASE=${{MODELSERVE_SKIP_BASE:-0}}" >>{calls}\n'
                f'[[ -e {cold} ]] || exit 0\n'
                'echo "08:00:00 [local-cloud] installing lxd mmdebstrap" >&2\n'
                + noise(120, "apt-get") +
                'echo "08:00:00 [local-cloud] starting the LXD daemon (no systemd here)" >&2\n'
                'echo "08:00:00 [local-cloud] lxd init --preseed (pool default)" >&2\n'
                'if [[ ${MODELSERVE_SKIP_BASE:-0} != 1 ]]; then\n'
                '  echo "08:00:00 [local-cloud] mmdebstrap Debian 12 (bookworm) into /x" >&2\n'
                + noise(200, "mmdebstrap") + f'  touch {tmp_path}/base-built\nfi\n')
    bake = script(d / "bake.py", f'echo "bake $*" >>{calls}\n' + COLD_BAKE)
    status = {"live": "g1", "previous": "g0", "url": "http://10.87.43.10:8080/"}
    python = script(d / "python", f'echo "python $*" >>{calls}\n'
                    'if [[ $3 == deploy ]]; then\n'
                    '  echo "✓ allocate the floating IP of env dev (0.1s)" >&2\n'
                    '  echo "  ms-dev-g1-front0 is up at 10.87.42.9" >&2\n'
                    '  echo "✓ launch front ms-dev-g1-front0 (g1, blue) (30.0s)" >&2\n'
                    '  echo "✓ health-gate ms-dev-g1-front0 (...) (30.0s)" >&2\n'
                    '  echo "✓ point the floating IP at ms-dev-g1-front0 (g0 -> g1) (0.2s)" >&2\n'
                    '  echo "deploy done: g1 is live in dev at http://10.87.43.10:8080/" >&2\n'
                    '  exit ${DEPLOY_EXIT:-0}\nfi\n'
                    f"echo '{json.dumps(status)}'\n")

    def fingerprint(alias, project="default"):
        if alias == "modelserve-base-debian12" and cold.exists():
            return "base-built000000" if (tmp_path / "base-built").exists() else None
        return images.get(alias)
    monkeypatch.setattr(demo, "UP", up)
    monkeypatch.setattr(demo, "BAKE", bake)
    monkeypatch.setattr(demo, "alias_fingerprint", fingerprint)
    monkeypatch.setattr(demo, "BAKE_PYTHON", "/bin/bash")  # runs the bake stand-in
    log = tmp_path / "demo.log"

    def run(*extra, env=None):
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        out = io.StringIO()
        code = demo.main(["--release", "g1", "--env", "dev", "--python", str(python),
                          "--make", str(make), "--log", str(log), *extra], out=out)
        return code, out.getvalue().splitlines(), log.read_text()
    run.images, run.calls, run.tmp = images, calls, tmp_path
    return run


def test_a_cold_run_prints_one_line_per_phase_and_logs_the_rest(fake):
    (fake.tmp / "cold").touch()
    code, lines, log = fake()
    assert code == 0, "\n".join(lines)
    assert len(lines) < 40, "\n".join(lines)
    text = "\n".join(lines)
    phases = [m.group(1).strip() for ln in lines if (m := re.match(r"✓ (.{18}) ", ln))]
    assert phases == ["python venv", "LXD", "base image", "wheelhouse", "dependencies layer",
                      "release layer"], text
    assert "built with mmdebstrap: modelserve-base-debian12" in text
    assert "downloaded the pinned wheels" in text
    assert "baked modelserve-deps-abc" in text and "baked modelserve-g1 (415 MiB" in text
    assert "installed packages, daemon started, configured pool + bridge" in text
    # the deploy's steps are shown (launch, gate, switch), its detail lines only logged
    assert "  ✓ launch front ms-dev-g1-front0 (g1, blue) (30.0s)" in lines
    assert "  ✓ point the floating IP at ms-dev-g1-front0 (g0 -> g1) (0.2s)" in lines
    assert not any("is up at" in ln for ln in lines) and "is up at 10.87.42.9" in log
    # the end: URL, release, what to try next, the log
    assert "modelserve g1 is live at http://10.87.43.10:8080/" in lines
    assert any("release   g1 (previous: g0)" in ln for ln in lines)
    for cmd in ("-m rollout status --cloud lxd --env dev",
                "-m rollout rollback --cloud lxd --env dev", "make demo-down"):
        assert any(ln.rstrip().endswith(cmd) for ln in lines), cmd
    assert str(fake.tmp / "demo.log") in lines[0]
    # nothing of the noise on the console, all of it in the log
    assert not any(re.search(r"(apt-get|mmdebstrap|pip download|lxd\.modelserve.*) line", ln)
                   for ln in lines)
    for what, n in (("apt-get", 240), ("mmdebstrap", 200), ("pip download", 150),
                    ("==> lxd.modelserve: apt", 250)):
        assert len(re.findall(rf"^{re.escape(what)} line \d+$", log, re.M)) == n, what
    assert "bake --cloud lxd --release g1 --env dev --skip-local-cloud" in \
        fake.calls.read_text()


def test_a_warm_run_says_what_it_reused_and_bakes_nothing(fake):
    fake.images["modelserve-g1"] = "feedface00001111"
    code, lines, _ = fake()
    text = "\n".join(lines)
    assert code == 0, text
    assert "already up (bridge msbr0)" in text
    assert "reused modelserve-base-debian12 (base01234567)" in text
    assert "reused modelserve-g1 (feedface0000)" in text
    assert "wheelhouse" not in text.split("reused modelserve-g1")[0]
    assert "bake " not in fake.calls.read_text()


@pytest.mark.parametrize("where", ["bake", "deploy"])
def test_a_failing_phase_shows_the_log_and_exits_non_zero(fake, where):
    if where == "bake":
        demo.BAKE.write_text(demo.BAKE.read_text().replace(
            'echo "08:00:02 [bake] baking release', 'echo "make image: error: provisioner '
            'install_rabbitmq.sh failed at line 3 (exit 100): apt-get" >&2; exit 1\necho "'))
        (fake.tmp / "cold").touch()
        code, lines, log = fake()
    else:
        code, lines, log = fake(env={"DEPLOY_EXIT": "5"})
    text = "\n".join(lines)
    assert code == (1 if where == "bake" else 5), text
    assert "modelserve g1 is live" not in text
    if where == "bake":
        assert any(ln.startswith("✗ dependencies layer") and "install_rabbitmq.sh failed at line 3"
                   in ln for ln in lines), text
        assert f"--- last {demo.TAIL} lines of {fake.tmp / 'demo.log'} ---" in lines
        assert "==> lxd.modelserve: apt line 250" in lines  # the tail of the failing output
        assert lines[-1].startswith("--- make demo failed: dependencies layer bake failed")
    else:
        assert "  ms-dev-g1-front0 is up at 10.87.42.9" in lines  # the deploy's whole output
        assert lines[-1].startswith("✗ deploy failed (exit 5)")
    assert str(fake.tmp / "demo.log") in lines[-1]


def test_the_bake_lines_the_demo_reads_are_the_ones_bake_py_prints():
    """The phase boundaries come from packer/bake.py's progress lines: same wording."""
    src = (ROOT / "packer" / "bake.py").read_text()
    for needle, regex in (
            ('log(f"wheelhouse: pip download', demo.BAKE_WHEELHOUSE),
            ('log(f"baking deps layer {deps_alias} ', demo.BAKE_DEPS_BAKING),
            ('log(f"deps layer {deps_alias} unchanged: reused")', demo.BAKE_DEPS_REUSED),
            ('log(f"deps layer {alias} copied from the default project")', demo.BAKE_DEPS_REUSED),
            ('log(f"baking release layer {image} on', demo.BAKE_RELEASE)):
        assert needle in src, needle
        line = ("08:00:00 [bake] " + needle.split('log(f"', 1)[1].rstrip('")')
                .replace("{deps_alias}", "modelserve-deps-1").replace("{alias}", "modelserve-deps-1")
                .replace("{image}", "modelserve-g1"))
        assert regex.search(line), line
    assert 'print(f"image {result[\'image\']} fingerprint {result[\'fingerprint\']}"' in src
    assert '(f", image {size / 2**20:.0f} MiB"' in src
    assert demo.BAKE_IMAGE.search("image modelserve-g1 fingerprint 0a1b")
    assert demo.BAKE_SIZE.search("bake time 9 s (…), image 415 MiB")


def test_the_demo_acts_on_the_local_cloud_whatever_the_shell_says(fake):
    """An openrc sourced in the shell (OS_CLOUD) must not send the demo's deploy and status
    to a real OpenStack: both name --cloud lxd."""
    code, lines, _ = fake(env={"OS_CLOUD": "production", "OS_AUTH_URL": "https://keystone"})
    assert code == 0, "\n".join(lines)
    calls = fake.calls.read_text()
    assert "-m rollout deploy --cloud lxd --env dev --release g1" in calls, calls
    assert "-m rollout status --cloud lxd --env dev --json" in calls, calls


@pytest.mark.parametrize("target", ["demo-down", "release", "rollout-status", "demo"])
def test_the_demo_targets_pin_the_local_cloud_and_the_demo_project(target):
    """`make demo-down` with an openrc sourced destroyed the env on the real cloud; each
    demo target names the local cloud and the demo's LXD project on its command lines."""
    env = dict(os.environ, OS_CLOUD="production", MODELSERVE_LXD_PROJECT="someone-elses")
    out = subprocess.run(["make", "-n", "-C", str(ROOT), target, "PY=python3"], env=env,
                         capture_output=True, text=True, check=True).stdout
    rollout_lines = [ln for ln in out.splitlines() if "-m rollout" in ln or "demo.py" in ln]
    assert rollout_lines, out
    for line in rollout_lines:
        assert "MODELSERVE_LXD_PROJECT=default" in line, line
        if "-m rollout" in line:
            assert "--cloud lxd" in line, line
