"""Where the harness lives and listens: one state dir, loopback ports, and the config files."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
REQUIREMENTS = REPO / "requirements-openstack.txt"
PLUGINS = HERE / "plugins"
CLOUD = "modelserve-os"
REGION = "RegionOne"
HOST = "127.0.0.1"

# The first project's loopback networks (fixed, floating): a tenant with no compute host of
# its own, for the harness's checks of Keystone, Neutron and tenant isolation.
PRIVATE_CIDR = "127.42.0.0/24"
PUBLIC_CIDR = "127.43.0.0/24"

# The compute host (lxd_driver.py): nova-compute as host LXD_HOST, in aggregate /
# availability zone LXD_AZ, reserved to project LXD_PROJECT_OS (its servers land nowhere else,
# nobody else's land there). Its servers are containers in the LXD project LXD_PROJECT on the
# bridge LXD_BRIDGE, which the harness creates: the Neutron subnet of that project IS the
# bridge's subnet, and floating IPs come from LXD_FIP_CIDR (network forwards on the bridge).
LXD_HOST = "ms-lxd"
LXD_AZ = "lxd"
LXD_PROJECT_OS = "modelserve-lxd"
LXD_PROJECT = os.environ.get("MODELSERVE_OS_LXD_PROJECT", "modelserve-os")
LXD_BRIDGE = os.environ.get("MODELSERVE_OS_LXD_BRIDGE", "msosbr0")
LXD_GATEWAY = os.environ.get("MODELSERVE_OS_LXD_GATEWAY", "10.88.42.1")
LXD_CIDR = os.environ.get("MODELSERVE_OS_LXD_CIDR", "10.88.42.0/24")
LXD_FIP_CIDR = os.environ.get("MODELSERVE_OS_LXD_FIP_CIDR", "10.88.43.0/24")
LXD_POOL = os.environ.get("MODELSERVE_OS_LXD_POOL", "default")
LXD_BASE_ALIAS = os.environ.get("MODELSERVE_BASE_ALIAS", "modelserve-base-debian12")
LXD_DISK_FORMAT = "lxd"  # Glance disk_format of an LXD unified tarball (container_format bare)


def _port(name: str, default: int) -> int:
    return int(os.environ.get(f"MODELSERVE_OS_{name}_PORT", default))


@dataclass(frozen=True)
class Ports:
    """Every TCP port the harness binds on 127.0.0.1 (MODELSERVE_OS_<NAME>_PORT overrides)."""

    mysql: int = field(default_factory=lambda: _port("MYSQL", 19306))
    rabbit: int = field(default_factory=lambda: _port("RABBIT", 19672))
    rabbit_dist: int = field(default_factory=lambda: _port("RABBIT_DIST", 19673))
    keystone: int = field(default_factory=lambda: _port("KEYSTONE", 19500))
    glance: int = field(default_factory=lambda: _port("GLANCE", 19292))
    placement: int = field(default_factory=lambda: _port("PLACEMENT", 19778))
    nova: int = field(default_factory=lambda: _port("NOVA", 19774))
    neutron: int = field(default_factory=lambda: _port("NEUTRON", 19696))


def requirements_hash() -> str:
    """Key of the services venv: the pinned requirements and the interpreter version."""
    h = hashlib.sha256(REQUIREMENTS.read_bytes())
    h.update(f"{sys.version_info[:2]}".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Layout:
    """Paths under the state dir (MODELSERVE_OS_STATE, default /var/tmp/modelserve-openstack)."""

    state: Path = field(default_factory=lambda: Path(
        os.environ.get("MODELSERVE_OS_STATE", "/var/tmp/modelserve-openstack")))
    cache: Path = field(default_factory=lambda: Path(
        os.environ.get("MODELSERVE_OS_CACHE", "/var/cache/modelserve")))

    @property
    def venv(self) -> Path:
        """The services venv, keyed by the requirements hash (rebuilt when absent)."""
        return self.cache / "openstack-venv" / requirements_hash()

    @property
    def etc(self) -> Path:
        return self.state / "etc"

    @property
    def mysql(self) -> Path:
        return self.state / "mysql"

    @property
    def rabbit(self) -> Path:
        return self.state / "rabbitmq"

    @property
    def clouds_yaml(self) -> Path:
        return self.state / "clouds.yaml"

    def secrets(self) -> dict:
        """Passwords of this state dir, generated once (mode 0600), never in the repo."""
        path = self.state / "secrets.json"
        if path.exists():
            return json.loads(path.read_text())
        values = {k: secrets.token_hex(12) for k in (
            "db", "rabbit", "admin", "service", "modelserve")}
        self.state.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(values, fh)
        return values


SERVICES = ("glance", "placement", "nova", "neutron")


def render(layout: Layout, ports: Ports, pw: dict) -> dict[Path, str]:
    """Every config file of the control plane, path → text."""
    s, etc = layout.state, layout.etc
    db = f"mysql+pymysql://openstack:{pw['db']}@{HOST}:{ports.mysql}"
    rabbit = f"rabbit://openstack:{pw['rabbit']}@{HOST}:{ports.rabbit}/"
    auth_url = f"http://{HOST}:{ports.keystone}/v3"

    def authtoken(user: str) -> str:
        return (f"[keystone_authtoken]\nwww_authenticate_uri = {auth_url}\n"
                f"auth_url = {auth_url}\nauth_type = password\n"
                f"project_domain_name = Default\nuser_domain_name = Default\n"
                f"project_name = service\nusername = {user}\npassword = {pw['service']}\n"
                f"region_name = {REGION}\nservice_token_roles_required = true\n")

    def client(section: str, user: str) -> str:
        return (f"[{section}]\nauth_url = {auth_url}\nauth_type = password\n"
                f"project_domain_name = Default\nuser_domain_name = Default\n"
                f"project_name = service\nusername = {user}\npassword = {pw['service']}\n"
                f"region_name = {REGION}\n")

    files = {
        etc / "keystone/keystone.conf": f"""[DEFAULT]
[database]
connection = {db}/keystone
[token]
provider = fernet
[fernet_tokens]
key_repository = {s}/keystone/fernet-keys
[credential]
key_repository = {s}/keystone/credential-keys
""",
        etc / "glance/glance-api.conf": f"""[DEFAULT]
enabled_backends = fs:file
worker_self_reference_url = http://{HOST}:{ports.glance}
[image_format]
disk_formats = ami,ari,aki,vhd,vhdx,vmdk,raw,qcow2,vdi,iso,ploop,{LXD_DISK_FORMAT}
[database]
connection = {db}/glance
{authtoken('glance')}
[paste_deploy]
flavor = keystone
config_file = {etc}/glance/glance-api-paste.ini
[glance_store]
default_backend = fs
[fs]
filesystem_store_datadir = {s}/glance/images
[os_glance_staging_store]
filesystem_store_datadir = {s}/glance/staging
[os_glance_tasks_store]
filesystem_store_datadir = {s}/glance/tasks
[oslo_concurrency]
lock_path = {s}/glance/lock
""",
        etc / "placement/placement.conf": f"""[DEFAULT]
[placement_database]
connection = {db}/placement
[api]
auth_strategy = keystone
{authtoken('placement')}
""",
        etc / "nova/nova.conf": f"""[DEFAULT]
transport_url = {rabbit}
host = modelserve-control
my_ip = {HOST}
state_path = {s}/nova
instances_path = {s}/nova/instances
vif_plugging_is_fatal = false
vif_plugging_timeout = 0
heal_instance_info_cache_interval = -1
[api]
auth_strategy = keystone
[wsgi]
api_paste_config = {etc}/nova/api-paste.ini
[api_database]
connection = {db}/nova_api
[database]
connection = {db}/nova
{authtoken('nova')}
{client('placement', 'nova')}
{client('neutron', 'nova')}
[glance]
region_name = {REGION}
{client('service_user', 'nova')}send_service_user_token = true
[scheduler]
discover_hosts_in_cells_interval = 2
limit_tenants_to_placement_aggregate = true
[filter_scheduler]
track_instance_changes = false
enabled_filters = ComputeFilter,ComputeCapabilitiesFilter,ImagePropertiesFilter,\
ServerGroupAntiAffinityFilter,ServerGroupAffinityFilter,AggregateMultiTenancyIsolation
[oslo_concurrency]
lock_path = {s}/nova/lock
[oslo_messaging_notifications]
driver = noop
[vnc]
enabled = false
[cinder]
os_region_name = {REGION}
""",
        etc / "nova/nova-lxd.conf": f"""[DEFAULT]
host = {LXD_HOST}
compute_driver = modelserve_lxd.LxdDriver
# its servers are containers sharing this machine's cores (the flavor's vcpus become
# limits.cpu), so a Packer build server may boot beside a test's front, worker and warm
# release: Nova's default ratio (4 per core) would fit four 2-vcpu servers on 2 cores
cpu_allocation_ratio = 16.0
state_path = {s}/nova-lxd
instances_path = {s}/nova-lxd/instances
[oslo_concurrency]
lock_path = {s}/nova-lxd/lock
""",
        etc / "neutron/neutron.conf": f"""[DEFAULT]
core_plugin = ml2
service_plugins = modelserve_os_plugins.l3.ActiveFipL3Plugin
transport_url = {rabbit}
auth_strategy = keystone
api_paste_config = {etc}/neutron/api-paste.ini
state_path = {s}/neutron
allow_overlapping_ips = true
dhcp_agent_notification = false
notify_nova_on_port_status_changes = true
notify_nova_on_port_data_changes = true
[database]
connection = {db}/neutron
{authtoken('neutron')}
{client('nova', 'neutron')}
[oslo_concurrency]
lock_path = {s}/neutron/lock
[oslo_messaging_notifications]
driver = noop
""",
        etc / "neutron/plugins/ml2/ml2_conf.ini": """[ml2]
type_drivers = flat,vxlan
tenant_network_types = vxlan
mechanism_drivers = modelserve_loopback
extension_drivers = port_security
[ml2_type_flat]
flat_networks = public,public-lxd
[ml2_type_vxlan]
vni_ranges = 1:1000
""",
        layout.rabbit / "rabbitmq.conf": f"""listeners.tcp.1 = {HOST}:{ports.rabbit}
loopback_users = none
log.console = false
log.file.level = warning
""",
        layout.rabbit / "enabled_plugins": "[].\n",
    }
    return files


def service_env(layout: Layout, name: str) -> dict:
    """Environment of one OpenStack process: its config dir, the plugins, nothing of ours."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OS_", "VIRTUAL_ENV", "PYTHONPATH", "MODELSERVE_"))}
    env["PATH"] = f"{layout.venv}/bin:" + env.get("PATH", "/usr/bin:/bin")
    env["PYTHONPATH"] = str(PLUGINS)
    etc = layout.etc
    env.update({
        "OS_KEYSTONE_CONFIG_DIR": str(etc / "keystone"),
        "OS_GLANCE_CONFIG_DIR": str(etc / "glance"),
        "OS_PLACEMENT_CONFIG_DIR": str(etc / "placement"),
        "OS_NOVA_CONFIG_DIR": str(etc / "nova"),
        "OS_NEUTRON_CONFIG_DIR": str(etc / "neutron"),
        "OS_NEUTRON_CONFIG_FILES": "neutron.conf;plugins/ml2/ml2_conf.ini",
        # the LXD host's driver and the L3 plugin's forwards (lxdcli.py); a private lxc
        # config dir: never the user's current project/remote
        "MODELSERVE_OS_LXD_PROJECT": LXD_PROJECT,
        "MODELSERVE_OS_LXD_BRIDGE": LXD_BRIDGE,
        "MODELSERVE_OS_LXD_POOL": LXD_POOL,
        "MODELSERVE_OS_LXD_FIP_CIDR": LXD_FIP_CIDR,
        "LXD_CONF": str(layout.state / "lxc-conf"),
    })
    return env
