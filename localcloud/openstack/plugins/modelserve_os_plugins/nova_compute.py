"""nova-compute with the harness's driver: Nova only loads drivers under `nova.virt.`, so the
driver module is aliased there before Nova's own entry point runs (after its monkey patch):
`modelserve_lxd.LxdDriver` (lxd_driver.py)."""

import sys

import nova.virt
from nova.cmd.compute import main  # noqa: I001 - nova must patch first

from modelserve_os_plugins import lxd_driver

sys.modules["nova.virt.modelserve_lxd"] = lxd_driver
nova.virt.modelserve_lxd = lxd_driver

if __name__ == "__main__":
    sys.exit(main())
