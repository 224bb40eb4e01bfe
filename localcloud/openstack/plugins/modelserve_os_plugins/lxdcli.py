"""The few LXD calls the harness's OpenStack plugins make, through the `lxc` CLI (stdlib only:
the services venv has no pylxd, and `lxc query` speaks LXD's REST API over its unix socket).

Every call names its project explicitly; LXD_CONF (set by the harness) is a private lxc
config dir, so the user's current project or remotes never matter.
"""

import json
import os
import subprocess


class LxdError(RuntimeError):
    """An lxc call failed; the message has its stderr."""


def project():
    return os.environ.get("MODELSERVE_OS_LXD_PROJECT", "modelserve-os")


def bridge():
    return os.environ.get("MODELSERVE_OS_LXD_BRIDGE", "msosbr0")


def run(*args, check=True, timeout=600, input=None, env=None, error=LxdError):
    """Run `lxc ARGS` (``env``: the whole environment, e.g. another LXD_CONF); returns the
    CompletedProcess (raises ``error`` when check and it fails)."""
    proc = subprocess.run(["lxc", *args], capture_output=True, text=True, timeout=timeout,
                          input=input, env=env, check=False)
    if check and proc.returncode:
        raise error(f"lxc {' '.join(args[:5])}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def lxc(*args, check=True, timeout=600, input=None):
    """Run `lxc ARGS`; returns stdout (raises LxdError when check and it fails)."""
    proc = run(*args, check=check, timeout=timeout, input=input)
    return proc.stdout if proc.returncode == 0 else None


def query(path, method="GET", data=None, wait=False, check=True, timeout=600, env=None,
          error=LxdError):
    """`lxc query` (raw REST; `path` carries ?project=): parsed JSON, or None when it failed
    and not check (e.g. 404)."""
    args = ["query", "-X", method]
    if wait:
        args.append("--wait")
    if data is not None:
        args += ["-d", json.dumps(data)]
    proc = run(*args, path, check=check, timeout=timeout, env=env, error=error)
    if proc.returncode:
        return None
    out = proc.stdout.strip()
    return json.loads(out) if out else {}


def p(path, proj=None):
    """`path` in our project (appends ?project= / &project=)."""
    sep = "&" if "?" in path else "?"
    return f"{path}{sep}project={proj or project()}"


def instance(name):
    """The instance's record (recursion=1 not needed: config + status), or None."""
    return query(p(f"/1.0/instances/{name}"), check=False)


def forwards(net=None):
    """The forwards on the bridge (a list of dicts)."""
    return query(f"/1.0/networks/{net or bridge()}/forwards?recursion=1") or []
