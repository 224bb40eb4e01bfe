"""An ML2 mechanism driver that binds every port on any host, with no agent.

Neutron's shipped `test`/`fake_agent` drivers only work inside its own test tree; real
deployments bind through an agent or OVN. Here the "hypervisor" is a process on loopback,
so binding is a formality: accept the first segment and mark the port ACTIVE.
"""

from neutron_lib import constants
from neutron_lib.api.definitions import portbindings
from neutron_lib.plugins.ml2 import api


class LoopbackMechanismDriver(api.MechanismDriver):
    """Bind any port to the first segment offered, status ACTIVE."""

    def initialize(self):
        """Nothing to set up: there is no agent to talk to."""

    def bind_port(self, context):
        """Bind to the first segment; Nova's fake driver ignores the VIF details."""
        for segment in context.segments_to_bind:
            context.set_binding(
                segment[api.ID],
                portbindings.VIF_TYPE_OVS,
                {portbindings.CAP_PORT_FILTER: True},
                status=constants.PORT_STATUS_ACTIVE,
            )
            return
