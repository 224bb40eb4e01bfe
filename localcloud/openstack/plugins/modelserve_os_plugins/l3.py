"""An L3 service plugin whose floating IPs go ACTIVE without an L3 agent.

It also makes traffic sent to a floating address really reach the port it is associated with
(the job an L3 agent or OVN does in a real cloud): a floating IP from the LXD host's range
(MODELSERVE_OS_LXD_FIP_CIDR, network ``public-lxd``) is an LXD network forward on the LXD
bridge: listen address = the floating IP, default target = the fixed IP (all ports, as 1:1
NAT), kept in sync on every change. Floating IPs of other networks (the first project's
loopback ``public``, which no compute host serves) only change status.
"""

import ipaddress
import logging
import os
import threading

from neutron.services.l3_router import l3_router_plugin
from neutron_lib import constants
from neutron_lib import context as n_context

from modelserve_os_plugins import lxdcli


class ActiveFipL3Plugin(l3_router_plugin.L3RouterPlugin):
    """L3RouterPlugin + agentless FIP status + the LXD forwards of floating IPs."""

    def create_floatingip(self, context, floatingip, initial_status=None):
        """Create, then mark ACTIVE when associated (as OVN does)."""
        fip = super().create_floatingip(context, floatingip)
        return self._settle(context, fip)

    def update_floatingip(self, context, id, floatingip):
        """Update (associate/disassociate), then settle status and the forwards (only this
        floating IP's forward, when the others are known to be in sync)."""
        fip = super().update_floatingip(context, id, floatingip)
        return self._settle(context, fip, changed=fip)

    def delete_floatingip(self, context, id):
        """Delete, then drop its forward."""
        super().delete_floatingip(context, id)
        self._sync()

    def disassociate_floatingips(self, context, port_id):
        """A port goes (server deleted): its floating IPs lose their target, and so do the
        forwards. (This runs inside the port's delete transaction: a fresh session still
        sees the old association, so the port is left out explicitly.)"""
        result = super().disassociate_floatingips(context, port_id)
        self._sync(gone_port=port_id)
        return result

    # This cloud has no L3 agent (the forwards below are its data plane), so the agent
    # notifications L3RouterPlugin sends on every floating-IP change only cost time: each one
    # loads the router, runs the agent scheduler and looks up the hosts to notify, all through
    # pymysql. py-spy: half of a floating-IP PUT's samples; without them a PUT takes
    # 0.2-0.7 s instead of 0.4-1.3 s here.
    def notify_router_updated(self, context, router_id, operation=None):
        """No L3 agent to tell."""

    def _notify_floating_ip_change(self, context, floating_ip):
        """No (DVR) L3 agent to tell."""

    def _settle(self, context, fip, changed=None):
        status = (constants.FLOATINGIP_STATUS_ACTIVE if fip.get("port_id")
                  else constants.FLOATINGIP_STATUS_DOWN)
        if fip.get("status") != status:
            self.update_floatingip_status(context, fip["id"], status)
            fip = self.get_floatingip(context, fip["id"])  # new status and revision
        if changed is None or not self._sync_one(changed):
            self._sync()
        return fip

    def _sync_one(self, fip):
        """Bring one floating IP's forward in line when the last sync left every forward
        known (no listing of all floating IPs, no listing of the bridge's forwards: a
        switch's floating-IP PUT then costs one lxc call). False: do a full sync instead."""
        lxd_net = _lxd_net()
        addr = fip.get("floating_ip_address")
        if lxd_net is None or not addr or ipaddress.ip_address(addr) not in lxd_net:
            return True
        with _SYNC_LOCK:
            synced = getattr(self, "_forwards_synced", None)
            if synced is None:
                return False
            want = dict(synced)
            if fip.get("fixed_ip_address") and fip.get("port_id"):
                want[addr] = fip["fixed_ip_address"]
            else:
                want.pop(addr, None)
            if want == synced:
                return True
            ok = _sync_forward(addr, synced.get(addr), want.get(addr))
            self._forwards_synced = want if ok else None
            return ok

    def _sync(self, gone_port=None):
        lxd_net = _lxd_net()
        if lxd_net is None:
            return
        admin = n_context.get_admin_context()
        forwards = {f["floating_ip_address"]: f["fixed_ip_address"]
                    for f in self.get_floatingips(admin)
                    if f.get("fixed_ip_address") and f.get("port_id") != gone_port
                    and ipaddress.ip_address(f["floating_ip_address"]) in lxd_net}
        with _SYNC_LOCK:
            if forwards != getattr(self, "_forwards_synced", {}):
                # only when they change: a status-only update costs no lxc call
                self._forwards_synced = forwards if _sync_forwards(lxd_net, forwards) else None


LOG = logging.getLogger(__name__)
_SYNC_LOCK = threading.Lock()  # the API's threads: one sync at a time, one view of them
_FORWARD_BODY = {"description": "Neutron floating IP (modelserve harness)", "ports": []}


def _lxd_net():
    """The LXD host's floating-IP range (MODELSERVE_OS_LXD_FIP_CIDR), None when unset."""
    cidr = os.environ.get("MODELSERVE_OS_LXD_FIP_CIDR")
    return ipaddress.ip_network(cidr) if cidr else None


def _set_forward(addr, have, target):
    """Make the forward of `addr` point at `target` (None: no forward) given that it now
    points at `have` (None: absent); one lxc call, none when they already agree. Raises
    LxdError when LXD refuses (deleting a forward that is already gone is not refused)."""
    path = f"/1.0/networks/{lxdcli.bridge()}/forwards"
    body = dict(_FORWARD_BODY, config={"target_address": target})
    if target is None:
        if have is not None:
            lxdcli.query(f"{path}/{addr}", "DELETE", check=False)
    elif have is None:
        lxdcli.query(path, "POST", dict(body, listen_address=addr))
    elif have != target:
        lxdcli.query(f"{path}/{addr}", "PUT", body)


def _sync_forward(addr, have, target):
    """``_set_forward``; False (logged) when LXD disagrees, e.g. the forward was changed
    behind our back: the caller then syncs them all."""
    try:
        _set_forward(addr, have, target)
        return True
    except Exception:  # noqa: BLE001 - the full sync that follows repairs it
        LOG.warning("could not update the LXD forward of %s; syncing them all", addr,
                    exc_info=True)
        return False


def _sync_forwards(lxd_net, wanted):
    """Make the LXD bridge's forwards (listen addresses in `lxd_net`) exactly `wanted`
    ({floating address: fixed address}); a failure is logged, never fails the API call."""
    try:
        have = {f["listen_address"]: (f.get("config") or {}).get("target_address")
                for f in lxdcli.forwards()
                if ipaddress.ip_address(f["listen_address"]) in lxd_net}
        for addr in set(have) - set(wanted):
            _set_forward(addr, have[addr], None)
        for addr, target in wanted.items():
            _set_forward(addr, have.get(addr), target)
        return True
    except Exception:  # noqa: BLE001 - the API answer stands; the next change re-syncs
        LOG.exception("could not sync the LXD forwards of the floating IPs")
        return False
