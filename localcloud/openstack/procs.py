"""Start, find and stop the harness's daemons by PID file (and nothing else).

A PID file holds "PID STARTTIME" (field 22 of /proc/PID/stat), so a PID recycled after a
SIGKILLed session is never mistaken for ours: a stale file is simply removed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

# Popen objects of daemons started by this process: kept (never garbage-collected while
# running, so no ResourceWarning) and reaped by stop(), so no zombie lingers.
_CHILDREN: dict[int, subprocess.Popen] = {}


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return fields[19]  # field 22 overall; fields[] starts at field 3


class Procs:
    """The daemons of one state directory: run/<name>.pid and log/<name>.log."""

    def __init__(self, state: Path):
        self.run = state / "run"
        self.logs = state / "log"
        self.run.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)

    def pid(self, name: str) -> int | None:
        """The live PID of `name`, or None (removing a stale PID file)."""
        path = self.run / f"{name}.pid"
        try:
            pid_s, start = path.read_text().split()
            pid = int(pid_s)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            return None
        if _start_time(pid) != start:
            path.unlink(missing_ok=True)
            return None
        return pid

    def start(self, name: str, argv: list[str], env: dict | None = None,
              cwd: str | None = None) -> int:
        """Start `argv` in its own session unless `name` already runs; return its PID."""
        pid = self.pid(name)
        if pid:
            return pid
        self.run.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")
        try:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            log.close()
        start = None
        for _ in range(50):
            start = _start_time(proc.pid)
            if start:
                break
            time.sleep(0.01)
        (self.run / f"{name}.pid").write_text(f"{proc.pid} {start}\n")
        _CHILDREN[proc.pid] = proc
        return proc.pid

    def names(self) -> list[str]:
        """Every name with a PID file, live or not."""
        return sorted(p.stem for p in self.run.glob("*.pid"))

    def stop(self, name: str, timeout: float = 15.0) -> bool:
        """SIGTERM the process group of `name`, SIGKILL after `timeout`; True if it ran."""
        pid = self.pid(name)
        if not pid:
            return False
        if pid in _CHILDREN and _CHILDREN[pid].poll() is not None:
            _CHILDREN.pop(pid)
            (self.run / f"{name}.pid").unlink(missing_ok=True)
            return False
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _start_time(pid):
            time.sleep(0.1)
        if _start_time(pid):
            _signal_group(pid, signal.SIGKILL)
            time.sleep(0.2)
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            child.wait(timeout=5)
        (self.run / f"{name}.pid").unlink(missing_ok=True)
        return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def pid_alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie."""
    return _start_time(pid) is not None
