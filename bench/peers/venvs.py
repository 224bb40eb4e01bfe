"""The peers' venvs: one per bench-only requirements file, cached by the file's hash.

    python -m bench.peers.venvs [fastapi bentoml]   # build (or find) them, print their paths

A venv lives in /var/cache/modelserve/bench-venvs/<hash> (MODELSERVE_CACHE overrides the root),
where <hash> covers the requirements file and the interpreter version; it is rebuilt when
absent or unstamped. Each file is a full resolution (every package pinned, installed with
--no-deps), so a venv is a pure function of its file. TensorFlow wheels come from the image's
wheelhouse when it is there (the same pins as requirements.txt), else from the index.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("MODELSERVE_CACHE", "/var/cache/modelserve"))
PEERS = {"fastapi": HERE / "requirements-fastapi.txt", "bentoml": HERE / "requirements-bentoml.txt"}


def pins_hash(req: Path, python: str = sys.executable) -> str:
    """16 hex digits naming the venv built from `req` with `python`."""
    version = subprocess.run([python, "-c", "import sys; print(sys.version)"], capture_output=True,
                             text=True, check=True).stdout
    return hashlib.sha256(req.read_bytes() + version.encode()).hexdigest()[:16]


def ensure_venv(name: str, log=print) -> Path:
    """The venv for peer `name`, built now if the cache lacks it (under a lock)."""
    req = PEERS[name]
    base = CACHE / "bench-venvs"
    base.mkdir(parents=True, exist_ok=True)
    want = pins_hash(req, "python3")
    venv = base / want
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = venv / ".installed"
        if stamp.exists() and stamp.read_text().strip() == want:
            return venv
        log(f"bench: building the {name} venv in {venv} (once per requirements file)")
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        wheelhouse = CACHE / "wheelhouse"
        extra = ["--find-links", str(wheelhouse)] if wheelhouse.is_dir() else []
        env = {**os.environ, "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(CACHE / "pip"))}
        out = subprocess.run([str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check",
                              "--no-deps", *extra, "-r", str(req)], env=env, capture_output=True,
                             text=True)
        if out.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise SystemExit(f"bench: pip could not build the {name} venv:\n{out.stderr[-3000:]}")
        stamp.write_text(want + "\n")
        return venv


if __name__ == "__main__":
    for peer in sys.argv[1:] or list(PEERS):
        print(peer, ensure_venv(peer))
