"""An L3 service plugin whose floating IPs go ACTIVE without an L3 agent.

It also writes the floating-IP → fixed-IP map to a JSON file that the harness's forwarder
reads, so traffic sent to a floating address really reaches the port it is associated with
(the job an L3 agent or OVN does in a real cloud).
"""

import json
import os
import tempfile

from neutron.services.l3_router import l3_router_plugin
from neutron_lib import constants
from neutron_lib import context as n_context


class ActiveFipL3Plugin(l3_router_plugin.L3RouterPlugin):
    """L3RouterPlugin + agentless FIP status + a forwarding map for the harness."""

    def create_floatingip(self, context, floatingip, initial_status=None):
        """Create, then mark ACTIVE when associated (as OVN does)."""
        fip = super().create_floatingip(context, floatingip)
        return self._settle(context, fip)

    def update_floatingip(self, context, id, floatingip):
        """Update (associate/disassociate), then settle status and the forwarding map."""
        fip = super().update_floatingip(context, id, floatingip)
        return self._settle(context, fip)

    def delete_floatingip(self, context, id):
        """Delete, then refresh the forwarding map."""
        super().delete_floatingip(context, id)
        self._write_map()

    def _settle(self, context, fip):
        status = (constants.FLOATINGIP_STATUS_ACTIVE if fip.get("port_id")
                  else constants.FLOATINGIP_STATUS_DOWN)
        if fip.get("status") != status:
            self.update_floatingip_status(context, fip["id"], status)
            fip = self.get_floatingip(context, fip["id"])  # new status and revision
        self._write_map()
        return fip

    def _write_map(self):
        path = os.environ.get("MODELSERVE_OS_FIP_MAP")
        if not path:
            return
        admin = n_context.get_admin_context()
        mapping = {
            f["floating_ip_address"]: f["fixed_ip_address"]
            for f in self.get_floatingips(admin)
            if f.get("fixed_ip_address")
        }
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".fipmap")
        with os.fdopen(fd, "w") as fh:
            json.dump(mapping, fh)
        os.replace(tmp, path)
