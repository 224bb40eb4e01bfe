"""nova-compute with the harness's drivers: Nova only loads drivers under `nova.virt.`, so the
driver modules are aliased there before Nova's own entry point runs (after its monkey patch):
`modelserve_process.ProcessDriver` (virt.py) and `modelserve_lxd.LxdDriver` (lxd_driver.py)."""

import sys

import nova.virt
from nova.cmd.compute import main  # noqa: I001 - nova must patch first

from modelserve_os_plugins import lxd_driver, virt

sys.modules["nova.virt.modelserve_process"] = virt
nova.virt.modelserve_process = virt
sys.modules["nova.virt.modelserve_lxd"] = lxd_driver
nova.virt.modelserve_lxd = lxd_driver

if __name__ == "__main__":
    sys.exit(main())
