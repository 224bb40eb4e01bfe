"""Fixtures of the static image checks: the host tools they run (packer, shellcheck)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def host_tools() -> None:
    """packer, shellcheck, lxc… on the host (localcloud/lxd/up.sh --packages-only)."""
    proc = subprocess.run([str(ROOT / "localcloud" / "lxd" / "up.sh"), "--packages-only"],
                          text=True, capture_output=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"localcloud/lxd/up.sh --packages-only failed:\n{proc.stderr[-4000:]}")
