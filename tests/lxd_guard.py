"""A pytest plugin (registered by tests/conftest.py): the suite leaves the user's LXD alone.

Every test that touches LXD works in its own project (``MODELSERVE_LXD_PROJECT``, set here
for the whole session to ``modelserve-test``, or ``MODELSERVE_TEST_LXD_PROJECT``). This plugin
proves the user's ``default`` project was left untouched: when the session collects an LXD
tier (``e2e`` / ``image`` marker, or a test under tests/e2e, tests/image) and LXD answers, it
snapshots the default project's images (fingerprint + aliases), instances, profiles, the
managed networks and the forwards on every network; at the session's end (after every
fixture's teardown) it compares and FAILS the run, naming each difference.

Not a leftover: what localcloud/lxd/up.sh itself creates (the bridge and the base image; the
same as ``make demo``). When LXD did not answer at the start and a tier brought it up
(``snapshot_after_startup()``, called by the tiers' LXD fixtures after up.sh), the state right
after start-up is the reference. Forwards are shared by all projects: those of the test
project are not the default project's (left out of the comparison), and those of this
session's envs (``register_env``) still there at the end are deleted and named in the output
(a test should have removed them itself).

``MODELSERVE_LXD_GUARD=0`` disables the check (only for developing beside something else that
changes the default project at the same time; never in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

TEST_PROJECT = os.environ.get("MODELSERVE_TEST_LXD_PROJECT", "modelserve-test")
LXD_TIERS = ("tests/e2e/", "tests/image/")
LXD_MARKERS = ("e2e", "image")

_state: dict = {"wanted": False, "before": None, "envs": set()}


def _query(path: str) -> object:
    proc = subprocess.run(["lxc", "query", path], capture_output=True, text=True, timeout=60,
                          check=False, env={k: v for k, v in os.environ.items()
                                            if k != "LXD_CONF"})
    if proc.returncode:
        raise RuntimeError(f"lxc query {path}: {proc.stderr.strip()}")
    return json.loads(proc.stdout or "null")


def lxd_answers() -> bool:
    if shutil.which("lxc") is None:
        return False
    try:
        _query("/1.0")
        return True
    except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError):
        return False


def _base_alias() -> str:
    return os.environ.get("MODELSERVE_BASE_ALIAS", "modelserve-base-debian12")


def _bridge() -> str:
    return os.environ.get("MODELSERVE_LXD_BRIDGE", "msbr0")


def _harness_bridge() -> str:
    """The OpenStack harness's bridge (localcloud/openstack/config.py LXD_BRIDGE): its data
    plane, made and removed by the harness (the OpenStack tier, which may run beside this
    session, checks its own leftovers), so neither it nor its forwards are the user's."""
    return os.environ.get("MODELSERVE_OS_LXD_BRIDGE", "msosbr0")


def snapshot() -> dict[str, dict]:
    """The default project's state, as {kind: {key: value}} (comparable with ==)."""
    images = {}
    for img in _query("/1.0/images?project=default&recursion=1") or []:
        aliases = sorted(a["name"] for a in img.get("aliases") or [])
        if _base_alias() in aliases:
            continue  # up.sh's base image (rebuilt when its recipe changes): not a leftover
        images[img["fingerprint"][:12]] = aliases
    instances = {i["name"]: {"type": i.get("type"), "created_at": i.get("created_at")}
                 for i in _query("/1.0/instances?project=default&recursion=1") or []}
    profiles = {p["name"]: {"config": p.get("config"), "devices": p.get("devices"),
                            "description": p.get("description")}
                for p in _query("/1.0/profiles?project=default&recursion=1") or []}
    networks, forwards = {}, {}
    for net in _query("/1.0/networks?project=default&recursion=1") or []:
        if not net.get("managed") or net["name"] == _harness_bridge():
            continue
        if net["name"] != _bridge():  # up.sh's bridge: created/configured by the set-up
            networks[net["name"]] = {"type": net.get("type"), "config": net.get("config")}
        if net.get("type") != "bridge":
            continue
        for fwd in _query(f"/1.0/networks/{net['name']}/forwards?recursion=1") or []:
            if (fwd.get("config") or {}).get("user.modelserve.project") == TEST_PROJECT:
                continue  # the suite's own (swept at the end): not the default project's
            forwards[f"{net['name']}/{fwd['listen_address']}"] = {
                "description": fwd.get("description"), "config": fwd.get("config"),
                "ports": fwd.get("ports")}
    return {"images": images, "instances": instances, "profiles": profiles,
            "networks": networks, "forwards": forwards}


def diff(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    """One line per difference: '<kind> <key>: added|removed|changed (...)'."""
    out = []
    for kind in before:
        b, a = before[kind], after.get(kind, {})
        for key in sorted(set(b) | set(a)):
            if key not in b:
                out.append(f"{kind} {key}: added ({json.dumps(a[key], sort_keys=True)[:200]})")
            elif key not in a:
                out.append(f"{kind} {key}: removed")
            elif a[key] != b[key]:
                out.append(f"{kind} {key}: changed from {json.dumps(b[key], sort_keys=True)[:200]}"
                           f" to {json.dumps(a[key], sort_keys=True)[:200]}")
    return out


def register_env(env: str) -> str:
    """An env this session's tests use (its forward is swept at the end if still there)."""
    _state["envs"].add(env)
    return env


def sweep_test_forwards(project: str = TEST_PROJECT) -> list[str]:
    """Delete the forwards of this session's envs (test project) the tests left on the
    bridge; their addresses. Another session's envs (a concurrent tier) are not touched."""
    gone = []
    try:
        fwds = _query(f"/1.0/networks/{_bridge()}/forwards?recursion=1") or []
    except RuntimeError:
        return gone
    for fwd in fwds:
        cfg = fwd.get("config") or {}
        if cfg.get("user.modelserve.project") == project and \
                cfg.get("user.modelserve.env", "").removesuffix(".preview") in _state["envs"]:
            subprocess.run(["lxc", "network", "forward", "delete", _bridge(),
                            fwd["listen_address"]], capture_output=True, timeout=60, check=False)
            gone.append(fwd["listen_address"])
    return gone


def snapshot_after_startup() -> None:
    """A tier started LXD during the session: the state right after start-up is the
    reference (called by the LXD fixtures after localcloud/lxd/up.sh)."""
    if _state["wanted"] and _state["before"] is None and lxd_answers():
        _state["before"] = snapshot()


def pytest_configure(config):
    if TEST_PROJECT == "default":
        raise pytest.UsageError("MODELSERVE_TEST_LXD_PROJECT must not be the default project")
    # every LXD call of the session (rollout, bake, stand-ins, lxc) goes to the test project
    os.environ["MODELSERVE_LXD_PROJECT"] = TEST_PROJECT


def _touches_lxd(item) -> bool:
    path = item.nodeid.replace(os.sep, "/")
    return path.startswith(LXD_TIERS) or any(item.get_closest_marker(m) for m in LXD_MARKERS)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if os.environ.get("MODELSERVE_LXD_GUARD", "1") == "0":
        return
    if not any(_touches_lxd(i) for i in items):
        return
    _state["wanted"] = True
    if lxd_answers():
        _state["before"] = snapshot()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """After every fixture's teardown: sweep the suite's forwards, then compare."""
    if not _state["wanted"] or _state["before"] is None:
        return
    swept = sweep_test_forwards()
    lines = []
    if swept:
        lines.append(f"deleted forwards the suite left on {_bridge()}: {', '.join(swept)}")
    try:
        changes = diff(_state["before"], snapshot())
    except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
        changes = [f"could not read the default project at the end: {exc}"]
    rep = session.config.pluginmanager.get_plugin("terminalreporter")
    if changes:
        lines.append("the test session changed the default LXD project:")
        lines += [f"  {c}" for c in changes]
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if rep and lines:
        rep.write_sep("=", "LXD default-project check", red=bool(changes), yellow=not changes)
        for line in lines:
            rep.write_line(line)
    elif lines:
        print("\n".join(lines))
