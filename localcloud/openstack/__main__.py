"""python -m localcloud.openstack up|down|status|clouds-yaml|env"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from localcloud.openstack import seed
from localcloud.openstack.harness import Harness, HarnessError


def _exports(harness) -> str:
    return "export " + " ".join(f"{k}={v}" for k, v in seed.rollout_env(harness).items())


def main(argv=None) -> int:
    """Parse, run one command, turn failures into one line and exit 1."""
    parser = argparse.ArgumentParser(prog="python -m localcloud.openstack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "clouds-yaml", "env"])
    parser.add_argument("--json", action="store_true", help="machine output on stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="openstack-harness: %(message)s")
    harness = Harness()
    try:
        if args.command == "up":
            timings = harness.up()
            if args.json:
                print(json.dumps({"timings": timings, "state": str(harness.layout.state),
                                  "clouds_yaml": str(harness.layout.clouds_yaml),
                                  "cloud": seed.rollout_env(harness)["OS_CLOUD"],
                                  "env": seed.rollout_env(harness)}))
            else:
                print(f"# OpenStack up in {timings['total']:.1f}s; "
                      f"clouds.yaml at {harness.layout.clouds_yaml}:")
                print(harness.layout.clouds_yaml.read_text())
                print("# python -m rollout --cloud openstack deploys onto the LXD host with:")
                print(_exports(harness))
        elif args.command == "down":
            stopped = harness.down()
            print(json.dumps({"stopped": stopped}) if args.json
                  else "stopped: " + (", ".join(stopped) or "nothing was running"))
        elif args.command == "status":
            status = harness.status()
            if args.json:
                print(json.dumps(status))
            else:
                for name, pid in status.items():
                    print(f"{name:16} {'pid ' + str(pid) if pid else 'stopped'}")
            return 0 if all(status.values()) else 3
        elif args.command == "clouds-yaml":
            print(harness.write_clouds_yaml(), end="")
        elif args.command == "env":
            print(_exports(harness))
    except HarnessError as exc:
        print(f"openstack-harness: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("openstack-harness: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
