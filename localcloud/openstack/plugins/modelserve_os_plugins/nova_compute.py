"""nova-compute with the process driver: Nova only loads drivers under `nova.virt.`, so the
driver module is aliased there before Nova's own entry point runs (after its monkey patch)."""

import sys

import nova.virt
from nova.cmd.compute import main  # noqa: I001 - nova must patch first

from modelserve_os_plugins import virt

sys.modules["nova.virt.modelserve_process"] = virt
nova.virt.modelserve_process = virt

if __name__ == "__main__":
    sys.exit(main())
