"""Child process for the signal tests: ``cli.run()`` on an in-memory cloud.

``python -m tests.unit.rollout._cli_driver STATE_JSON ARGS...``: deploys release ``a`` to env
``dev`` (hook variables unset meanwhile), then runs ``python -m rollout ARGS`` on the same
cloud, writes the cloud's state before and after to STATE_JSON, and exits with its status.
"""

from __future__ import annotations

import io
import json
import os
import sys

from rollout import cli
from rollout.clouds.base import Release
from rollout.context import HOOK_DIR_ENV, PAUSE_ENV
from tests.unit.rollout.fakecloud import FakeCloud, free_port

ENV = "dev"


def releases() -> list[Release]:
    return [Release(f"img-{r}", f"modelserve-{r}", r, f"sha-{r}", 0.78, built_at=f"2026-01-0{n}",
                    provenance="release") for n, r in enumerate("ab", 1)]


def snapshot(cloud: FakeCloud) -> dict:
    fip = cloud.fips.get(ENV)
    live = next((i for i in cloud.instances.values() if fip and i.port == fip.target), None)
    return {"fips": len(cloud.floating_ips(ENV)),
            "target": fip.target if fip else None,
            "live": live.release if live else None,
            "revision": fip.revision if fip else None,
            "lock": fip.state.lock.encode() if fip and fip.state.lock else None,
            "instances": sorted(i.name for i in cloud.instances.values())}


def main() -> int:
    out, args = sys.argv[1], sys.argv[2:]
    cloud = FakeCloud(releases(), port=free_port())
    hook = {k: os.environ.pop(k) for k in (PAUSE_ENV, HOOK_DIR_ENV) if k in os.environ}
    def configure(ctx):
        ctx.port = cloud.port

    code = cli.run(["deploy", "--env", ENV, "--release", "a", "--no-probe"], cloud=cloud,
                   stdout=io.StringIO(), stderr=io.StringIO(), configure=configure)
    assert code == 0, code
    os.environ.update(hook)
    before = snapshot(cloud)
    code = cli.run(args, cloud=cloud, configure=configure)
    with open(out, "w") as f:
        json.dump({"before": before, "after": snapshot(cloud), "code": int(code)}, f)
    cloud.close()
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
