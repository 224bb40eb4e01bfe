"""localcloud/lxd/up.sh on a private LXD daemon (LXD_DIR) beside the shared one: a fresh set-up,
recovery from a SIGKILLed daemon and killed containers (what CI starts from), idempotence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.image.imgenv import ROOT
from tests.waiting import wait_for

pytestmark = pytest.mark.image
PRIVATE = Path("/var/lib/lxd-mstest")
# a private daemon: its default project is the suite's own (no LXD_CONF, no project)
ENV = {**{k: v for k, v in os.environ.items() if k not in ("LXD_CONF", "MODELSERVE_LXD_PROJECT")},
       "LXD_DIR": str(PRIVATE), "MODELSERVE_LXD_BRIDGE": "msbrt0",
       "MODELSERVE_LXD_SUBNET": "10.87.43.1/24"}


def run(*cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=ENV, text=True, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} -> exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def up() -> str:
    return run(str(ROOT / "localcloud" / "lxd" / "up.sh")).stderr


def daemon_pid() -> int:
    return json.loads(run("lxc", "query", "/1.0").stdout)["environment"]["server_pid"]


def wipe() -> None:
    """Stop the private daemon (ours) and remove everything it made."""
    if (PRIVATE / "unix.socket").exists():
        for c in json.loads(run("lxc", "list", "--format", "json", check=False).stdout or "[]"):
            run("lxc", "delete", "--force", c["name"], check=False)
        run("lxd", "shutdown", "--timeout", "60", check=False, timeout=90)
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[1].startswith(str(PRIVATE))]
    for mnt in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    subprocess.run(["ip", "link", "delete", "msbrt0"], capture_output=True)
    shutil.rmtree(PRIVATE, ignore_errors=True)


@pytest.fixture
def private_lxd():
    wipe()
    PRIVATE.mkdir(parents=True)
    yield
    wipe()


def address(name: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = json.loads(run("lxc", "query", f"/1.0/instances/{name}/state").stdout)
        for addr in (state.get("network") or {}).get("eth0", {}).get("addresses", []):
            if addr["family"] == "inet":
                return addr["address"]
        time.sleep(1)
    pytest.fail(f"{name} got no IPv4 address on the private bridge")


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_set_up_survives_a_killed_daemon_and_is_idempotent(private_lxd):
    first = up()
    assert "starting the LXD daemon" in first and "lxd init --preseed" in first
    run("lxc", "launch", "modelserve-base-debian12", "k1")
    assert address("k1").startswith("10.87.43.")

    # what a killed session leaves: daemon and container init SIGKILLed, socket and bridge stale
    init_pid = json.loads(run("lxc", "query", "/1.0/instances/k1/state").stdout)["pid"]
    lxd_pid = daemon_pid()
    os.kill(lxd_pid, 9)
    os.kill(init_pid, 9)
    wait_for(lambda: gone(lxd_pid) and gone(init_pid), 60,
             f"the killed daemon (pid {lxd_pid}) and container init (pid {init_pid}) exiting")
    assert (PRIVATE / "unix.socket").exists()

    again = up()
    assert "starting the LXD daemon" in again and "lxd init --preseed" not in again
    run("lxc", "launch", "modelserve-base-debian12", "k2")
    assert address("k2").startswith("10.87.43.")
    # NAT works: the container reaches the Debian archive through the bridge
    probe = run("lxc", "exec", "k2", "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                "--retry", "3", "http://deb.debian.org/debian/", check=False)
    assert probe.stdout == "200", probe.stdout + probe.stderr

    third = up()  # everything is up: nothing to do
    assert "starting" not in third and "preseed" not in third and "importing" not in third
