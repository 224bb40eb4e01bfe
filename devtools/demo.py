#!/usr/bin/env python3
"""`make demo`, quietly: one progress line per phase, everything else in a log file.

Phases: python venv, LXD, base image, then (only when the release image is missing) wheelhouse,
dependencies layer and release layer (packer/bake.py), then `python -m rollout deploy`, whose
own progress lines (launch, health gate, switch…) are shown as they come. apt, mmdebstrap, pip
and Packer output go to the log (its path is printed first); when a phase fails, the log's last
lines are shown and the exit status is non-zero. Ends with the URL, the release and what to
try next.

On a terminal the running phase shows its elapsed time on one line, rewritten in place; when
stdout is not a terminal (CI) only the finished phase lines are printed. Stdlib only: it runs
before the venv exists (the venv is its first phase). `make local-cloud`, `make image`
keep their full output: this only runs the same scripts with their output sent to the log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UP = ROOT / "localcloud" / "lxd" / "up.sh"
BAKE = ROOT / "packer" / "bake.py"
BAKE_PYTHON = sys.executable  # bake.py is stdlib only, as `make image` runs it (python3)
BASE_ALIAS = os.environ.get("MODELSERVE_BASE_ALIAS", "modelserve-base-debian12")
LOG_DIR = Path(os.environ.get("MODELSERVE_DEMO_LOG_DIR", "/var/tmp/modelserve-demo"))
TAIL = 200  # log lines shown when a phase fails
KEEP_LOGS = 10

# what packer/bake.py says on stderr (its `[bake]` progress lines) at each layer boundary
BAKE_WHEELHOUSE = re.compile(r"\[bake\] wheelhouse: pip download")
BAKE_DEPS_REUSED = re.compile(r"\[bake\] deps layer (\S+) (?:unchanged: reused|copied from)")
BAKE_DEPS_BAKING = re.compile(r"\[bake\] baking deps layer (\S+)")
BAKE_RELEASE = re.compile(r"\[bake\] baking release layer (\S+)")
BAKE_IMAGE = re.compile(r"^image (\S+) fingerprint (\S+)")
BAKE_SIZE = re.compile(r"image (\d+) MiB")


class PhaseFailed(Exception):
    """A phase failed; its line and the log's tail are already shown."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class Ui:
    """Phase lines on stdout. A terminal gets a live line with the elapsed time."""

    def __init__(self, out, log: Path):
        self.out = out
        self.tty = out.isatty()
        self.log = log
        self.name = ""
        self.detail = ""
        self.t0 = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def line(self, text: str = "") -> None:
        with self._lock:
            self._clear()
            self.out.write(text + "\n")
            self.out.flush()

    def _clear(self) -> None:
        if self.tty and self.name:
            self.out.write("\r\033[K")

    def _live(self) -> None:
        if self.tty and self.name:
            text = f"  … {self.name:<18} {time.monotonic() - self.t0:>4.0f}s  {self.detail}"
            width = shutil.get_terminal_size().columns - 1  # one line: \r rewrites it
            self.out.write("\r\033[K" + text[:width])
            self.out.flush()

    def start(self, name: str, detail: str = "") -> None:
        self.name, self.detail, self.t0 = name, detail, time.monotonic()
        if self.tty:
            self._live()
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                self._live()

    def update(self, detail: str) -> None:
        with self._lock:
            self.detail = detail
            self._live()

    def _halt(self) -> None:
        self._stop.set()
        if self._ticker:
            self._ticker.join()
            self._ticker = None

    def quiet_end(self) -> None:
        """End the live line without a phase line (the deploy prints its own)."""
        self._halt()
        with self._lock:
            self._clear()
            self.out.flush()
            self.name = ""

    def done(self, detail: str, ok: bool = True) -> float:
        secs = time.monotonic() - self.t0
        self._halt()
        mark = "✓" if ok else "✗"
        with self._lock:
            self._clear()
            self.out.write(f"{mark} {self.name:<18} {detail}  ({fmt_secs(secs)})\n")
            self.out.flush()
            self.name = ""
        return secs

    def fail(self, detail: str, code: int) -> PhaseFailed:
        """The failed phase's line, then the log's tail; the exception to raise."""
        if not self.name:  # between two phases
            self.name, self.t0 = "bake", time.monotonic()
        self.done(detail, ok=False)
        lines = read_tail(self.log, TAIL)
        self.line(f"--- last {len(lines)} lines of {self.log} ---")
        for text in lines:
            self.line(text)
        self.line(f"--- make demo failed: {detail} (exit {code}); full log: {self.log}")
        return PhaseFailed(code or 1)


def fmt_secs(secs: float) -> str:
    return f"{secs:.1f}s" if secs < 60 else f"{int(secs // 60)}m{int(secs % 60):02d}s"


def read_tail(path: Path, n: int) -> list[str]:
    with open(path, errors="replace") as fh:
        return [line.rstrip("\n") for line in deque(fh, maxlen=n)]


def new_log(explicit: str) -> Path:
    if explicit:
        path = Path(explicit)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
        return path
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    for old in sorted(LOG_DIR.glob("demo-*.log"))[:-(KEEP_LOGS - 1)]:
        old.unlink(missing_ok=True)
    path = LOG_DIR / f"demo-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.log"
    path.write_text("")
    return path


def run_logged(cmd: list[str], log: Path, *, env: dict | None = None, on_line=None,
               echo=None) -> int:
    """Run cmd with stdout+stderr appended to the log, line by line; on_line(line) sees each
    line (phase markers), echo(line) shows it. Ctrl-C reaches the child too (same process
    group): wait for it to clean up, then re-raise."""
    with open(log, "a") as fh:
        fh.write(f"\n=== {time.strftime('%H:%M:%S', time.gmtime())} $ {' '.join(cmd)}\n")
        fh.flush()
        with subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, errors="replace",
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL) as proc:
            return _pump(proc, fh, on_line, echo)


def _pump(proc: subprocess.Popen, fh, on_line, echo) -> int:
    """Copy the child's output to the log line by line, showing it to on_line/echo."""
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            fh.write(line)
            fh.flush()
            if on_line:
                on_line(line.rstrip("\n"))
            if echo:
                echo(line.rstrip("\n"))
        return proc.wait()
    except KeyboardInterrupt:
        fh.write("=== interrupted (Ctrl-C)\n")
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise


def lxc_json(path: str) -> dict | None:
    """`lxc query PATH` as JSON, or None (absent / LXD down)."""
    proc = subprocess.run(["lxc", "query", path], text=True, capture_output=True)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return None


def alias_fingerprint(alias: str, project: str = "default") -> str | None:
    found = lxc_json(f"/1.0/images/aliases/{alias}?project={project}")
    return found.get("target") if found else None


def default_env() -> dict:
    """The environment for up.sh: the default project (as bake.py gives it)."""
    return {k: v for k, v in os.environ.items() if k != "LXD_CONF"}


# --- phases -------------------------------------------------------------------------------

def phase_venv(ui: Ui, args) -> None:
    ui.start("python venv")
    stamp = ROOT / args.venv / ".installed"
    before = stamp.stat().st_mtime if stamp.exists() else None
    rc = run_logged([args.make, "--no-print-directory", "-s", "venv"], ui.log)
    if rc != 0:
        raise ui.fail("make venv failed", rc)
    after = stamp.stat().st_mtime if stamp.exists() else None
    ui.done(f"reused {args.venv}" if before is not None and before == after
            else f"installed the pinned {args.venv}")


LXD_NOTES = (("installing ", "installed packages"), ("wedged", "restarted a wedged daemon"),
             ("starting the LXD daemon", "daemon started"),
             ("lxd init --preseed", "configured pool + bridge"))


def phase_lxd(ui: Ui) -> None:
    ui.start("LXD")
    seen: list[str] = []

    def note(line: str) -> None:
        for needle, what in LXD_NOTES:
            if needle in line and "[local-cloud]" in line and what not in seen:
                seen.append(what)
                ui.update(", ".join(seen))
    rc = run_logged([str(UP)], ui.log, env={**default_env(), "MODELSERVE_SKIP_BASE": "1"},
                    on_line=note)
    if rc != 0:
        raise ui.fail("localcloud/lxd/up.sh failed", rc)
    bridge = os.environ.get("MODELSERVE_LXD_BRIDGE", "msbr0")
    ui.done((", ".join(seen) if seen else "already up") + f" (bridge {bridge})")


def phase_base(ui: Ui) -> None:
    ui.start("base image")
    before = alias_fingerprint(BASE_ALIAS)
    cached = []

    def note(line: str) -> None:
        if "mmdebstrap" in line and "[local-cloud]" in line:
            ui.update("mmdebstrap Debian 12 (a few minutes)")
        if "reusing cached" in line:
            cached.append(line)
    rc = run_logged([str(UP)], ui.log, env=default_env(), on_line=note)
    if rc != 0:
        raise ui.fail("base image (localcloud/lxd/build-base.sh) failed", rc)
    after = alias_fingerprint(BASE_ALIAS)
    if after and after == before:
        ui.done(f"reused {BASE_ALIAS} ({after[:12]})")
    else:
        how = "imported from the cached tarball" if cached else "built with mmdebstrap"
        ui.done(f"{how}: {BASE_ALIAS} ({(after or '?')[:12]})")


def phase_bake(ui: Ui, args) -> None:
    """packer/bake.py as three phases: wheelhouse, dependencies layer, release layer."""
    image = f"modelserve-{args.release}"
    fp = alias_fingerprint(image, args.project)
    if fp:
        ui.start("image")
        ui.done(f"reused {image} ({fp[:12]}): no wheelhouse, layer or bake needed")
        return
    state = {"phase": "wheelhouse", "downloaded": False, "deps": "", "image": "", "fp": "",
             "size": ""}
    ui.start("wheelhouse")

    def finish_wheelhouse() -> None:
        if state["phase"] == "wheelhouse":
            ui.done("downloaded the pinned wheels" if state["downloaded"]
                    else "reused /var/cache/modelserve/wheelhouse")

    def note(line: str) -> None:
        if BAKE_WHEELHOUSE.search(line):
            state["downloaded"] = True
            ui.update("pip download (TensorFlow: a few minutes)")
        elif m := BAKE_DEPS_REUSED.search(line):
            finish_wheelhouse()
            ui.start("dependencies layer")
            ui.done(f"reused {m.group(1)}")
            state["phase"] = "between"
        elif m := BAKE_DEPS_BAKING.search(line):
            finish_wheelhouse()
            state["phase"], state["deps"] = "deps", m.group(1)
            ui.start("dependencies layer", f"packer: baking {m.group(1)} (several minutes)")
        elif m := BAKE_RELEASE.search(line):
            finish_wheelhouse()
            if state["phase"] == "deps":
                ui.done(f"baked {state['deps']} (RabbitMQ, Redis, TensorFlow venv)")
            state["phase"] = "release"
            ui.start("release layer", f"packer: baking {m.group(1)}")
        elif m := BAKE_IMAGE.search(line):
            state["image"], state["fp"] = m.group(1), m.group(2)
        if m := BAKE_SIZE.search(line):
            state["size"] = f"{m.group(1)} MiB, "

    cmd = [BAKE_PYTHON, str(BAKE), "--cloud", "lxd", "--release", args.release,
           "--env", args.image_env, "--skip-local-cloud", *args.bake_arg]
    rc = run_logged(cmd, ui.log, on_line=note)
    if rc != 0:
        what = {"wheelhouse": "wheelhouse (pip download)", "deps": "dependencies layer bake",
                "release": "release layer bake"}.get(state["phase"], "bake")
        last = [ln for ln in read_tail(ui.log, 50) if "make image: error:" in ln]
        raise ui.fail(f"{what} failed" + (f": {last[-1].split('error: ', 1)[1]}" if last else ""),
                      rc)
    if state["phase"] == "wheelhouse":  # not seen: an older bake.py's wording
        ui.done("done")
        ui.start("release layer")
    ui.done(f"baked {state['image'] or image} ({state['size']}{state['fp'][:12] or '?'})")


def phase_deploy(ui: Ui, args) -> None:
    """`python -m rollout deploy`: its own progress lines (launch, gate, switch), shown."""
    ui.line(f"deploy {args.release} to env {args.env} (python -m rollout deploy):")
    env = {**os.environ, "COLUMNS": "160"}  # rich wraps at 80 columns on a pipe
    t0 = time.monotonic()
    seen: list[str] = []

    def echo(text: str) -> None:
        seen.append(text)
        # concise: the steps (✓/✗), warnings and the outcome; the "  detail" lines are logged
        if text.strip() and not text.startswith("  "):
            ui.line(f"  {text}")
    ui.start("deploy")  # a terminal shows the elapsed time below the finished steps
    try:
        rc = run_logged([args.python, "-m", "rollout", "deploy", "--cloud", "lxd", "--env",
                         args.env, "--release", args.release], ui.log, env=env, echo=echo)
    finally:
        ui.quiet_end()
    if rc != 0:
        ui.line(f"--- python -m rollout deploy, all {len(seen[-TAIL:])} lines ---")
        for text in seen[-TAIL:]:
            ui.line(text)
        ui.line(f"✗ deploy failed (exit {rc}) after {fmt_secs(time.monotonic() - t0)}: "
                f"the env's live release, if any, still serves; full log: {ui.log}")
        raise PhaseFailed(rc)


def closing(ui: Ui, args) -> None:
    proc = subprocess.run([args.python, "-m", "rollout", "status", "--cloud", "lxd", "--env",
                           args.env, "--json"], cwd=ROOT, text=True, capture_output=True)
    with open(ui.log, "a") as fh:
        fh.write(f"\n=== rollout status --json (exit {proc.returncode})\n{proc.stdout}"
                 f"{proc.stderr}")
    if proc.returncode != 0:
        ui.line(f"✗ rollout status failed (exit {proc.returncode}): {proc.stderr.strip()}")
        raise PhaseFailed(proc.returncode)
    st = json.loads(proc.stdout)
    py = os.path.relpath(args.python, ROOT) if args.python.startswith(str(ROOT)) else args.python
    ui.line("")
    ui.line(f"modelserve {st['live']} is live at {st['url']}")
    ui.line(f"  release   {st['live']} (previous: {st.get('previous') or '-'}), env {args.env}")
    ui.line(f"  try       {py} -m rollout status --cloud lxd --env {args.env}")
    ui.line(f"            {py} -m rollout rollback --cloud lxd --env {args.env}"
            + ("" if st.get("previous") else "   (once a second release is live: make release)"))
    ui.line("            make demo-down")
    ui.line(f"  log       {ui.log}")


def main(argv: list[str] | None = None, out=None) -> int:
    p = argparse.ArgumentParser(prog="devtools/demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--release", required=True, help="release id of the demo image")
    p.add_argument("--env", default="dev", help="rollout env (default dev)")
    p.add_argument("--image-env", default="dev", help="packer/env/<ENV>.pkrvars.hcl")
    p.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"),
                   help="the venv's python (runs python -m rollout)")
    p.add_argument("--venv", default=".venv")
    p.add_argument("--make", default="make")
    p.add_argument("--log", default=os.environ.get("DEMO_LOG", ""),
                   help="log file (default /var/tmp/modelserve-demo/demo-<UTC time>.log)")
    p.add_argument("--bake-arg", action="append", default=[],
                   help="extra argument for packer/bake.py (repeatable)")
    args = p.parse_args(argv)
    args.project = os.environ.get("MODELSERVE_LXD_PROJECT", "").strip() or "default"
    log = new_log(args.log)
    ui = Ui(out or sys.stdout, log)
    started = time.monotonic()
    ui.line(f"make demo: release {args.release}, env {args.env}; full output in {log}")
    try:
        phase_venv(ui, args)
        phase_lxd(ui)
        phase_base(ui)
        phase_bake(ui, args)
        phase_deploy(ui, args)
        closing(ui, args)
    except PhaseFailed as exc:
        return exc.code
    except KeyboardInterrupt:
        if ui.name:
            ui.done("interrupted", ok=False)
        ui.line(f"make demo: interrupted; full log: {log}")
        return 130
    ui.line(f"  took      {fmt_secs(time.monotonic() - started)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
