"""A Nova virt driver whose servers are LXD system containers (the harness's LXD host).

* Images: a Glance image with ``disk_format`` ``lxd`` (an LXD unified tarball; container_format
  ``bare``) is downloaded and imported into the LXD project once per image id (alias
  ``glance-<image id>``); anything else is refused (ImageUnacceptable).
* Servers: container ``instance.name`` in MODELSERVE_OS_LXD_PROJECT, config
  ``user.nova.uuid``; limits.cpu / limits.memory from the flavor; eth0 bridged on
  MODELSERVE_OS_LXD_BRIDGE with Neutron's MAC, and Neutron's fixed IP pinned
  (``ipv4.address``: LXD's DHCP can hand out nothing else to it).
* Nova's data to cloud-init: a NoCloud seed written into the container before its first
  start, in /var/lib/cloud/seed/nocloud/ (cloud-init reads that directory before the
  nocloud-net one the image's LXD templates fill, so this is the config drive): user-data =
  Nova's user_data, meta-data = instance-id, hostname, the keypair's public key and the
  server's metadata, network-config = Neutron's fixed IP, gateway and DNS, static on eth0.
  Root-only (0600): user_data carries secrets. (Not also ``cloud-init.user-data``: the
  image's templates would render it world-readable into nocloud-net/.)
* Power: stop/start/reboot/delete map to LXD's state API; get_info asks LXD.
* Resources: this machine's cores, RAM and the LXD pool's disk (MODELSERVE_OS_LXD_SHARE, a
  fraction, default 1), so Placement refuses what does not fit.
"""

import base64
import binascii
import gzip
import hashlib
import json
import os
import shutil
import tempfile

import yaml
from nova import exception
from nova.compute import power_state, task_states
from nova.objects import fields as obj_fields
from nova.virt import fake, hardware, images
from oslo_concurrency import lockutils
from oslo_config import cfg
from oslo_log import log as logging

from modelserve_os_plugins import lxdcli

LOG = logging.getLogger(__name__)
CONF = cfg.CONF
SEED_DIR = "/var/lib/cloud/seed/nocloud"
DISK_FORMAT = "lxd"
# the tier's fault switch: while this file exists in instances_path, a snapshot's upload to
# Glance breaks off half-way (tests/openstack/test_lxd_release.py)
UPLOAD_FAULT = "fault-snapshot-upload"
# ... and while this one exists, a new server's seed carries a line the image's first boot
# rejects (the server reaches ACTIVE, cloud-init runs, modelserve-firstboot fails)
SEED_FAULT = "fault-seed"
INSTANCE_ENV = "/etc/modelserve/instance.env"
RUNNING, STOPPED = 103, 102


def decode_user_data(user_data):
    """Nova stores user_data base64-encoded; return the text ('' when none)."""
    if not user_data:
        return ""
    try:
        raw = base64.b64decode(user_data)
    except (binascii.Error, ValueError):
        return ""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", "replace")


def _fault(name):
    """Whether the tier's fault switch `name` is on (a file in instances_path)."""
    return os.path.exists(os.path.join(CONF.instances_path, name))


def _seed_the_image_rejects(user_data):
    """The modelserve seed with a malformed line appended to its instance.env."""
    if not user_data.startswith("#cloud-config"):
        return user_data
    doc = yaml.safe_load(user_data) or {}
    for item in doc.get("write_files") or []:
        if item.get("path") == INSTANCE_ENV and not item.get("encoding"):
            item["content"] = item.get("content", "") + "this line is not KEY=VALUE\n"
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False)


def host_resources(share=1.0, pool_path="/var/lib/lxd"):
    """(vcpus, memory_mb, disk_gb) of this machine, times `share`."""
    vcpus = os.cpu_count() or 1
    with open("/proc/meminfo") as fh:
        mem_kb = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
    st = os.statvfs(pool_path if os.path.exists(pool_path) else "/")
    disk_gb = st.f_blocks * st.f_frsize // 1024 ** 3
    return (max(1, int(vcpus * share)), max(1, int(mem_kb // 1024 * share)),
            max(1, int(disk_gb * share)))


def network_config(network_info):
    """cloud-init network-config v1: each VIF's fixed IPv4, static, by MAC."""
    config = []
    for n, vif in enumerate(network_info or []):
        subnets = []
        for subnet in vif["network"]["subnets"]:
            if subnet["version"] != 4:
                continue
            prefix = subnet["cidr"].split("/")[1]
            for ip in subnet["ips"]:
                entry = {"type": "static", "address": f"{ip['address']}/{prefix}"}
                gateway = (subnet.get("gateway") or {}).get("address")
                if gateway and n == 0:
                    entry["gateway"] = gateway
                dns = [d["address"] for d in subnet.get("dns") or []] or (
                    [gateway] if gateway else [])
                if dns:
                    entry["dns_nameservers"] = dns
                subnets.append(entry)
        config.append({"type": "physical", "name": f"eth{n}", "mac_address": vif["address"],
                       "subnets": subnets})
    return {"version": 1, "config": config}


def meta_data(instance):
    """NoCloud meta-data: what Nova's metadata service would say about the server."""
    doc = {"instance-id": instance.uuid,
           "local-hostname": instance.hostname or instance.name,
           "hostname": instance.hostname or instance.name,
           "uuid": instance.uuid, "name": instance.display_name,
           "availability_zone": instance.availability_zone,
           "meta": dict(instance.metadata or {})}
    if instance.key_data:
        doc["public-keys"] = [instance.key_data.strip()]
    return doc


class LxdDriver(fake.FakeDriverWithoutFakeNodes):
    """Servers as LXD system containers; Nova's bookkeeping (node identity, resource
    reporting) from the fake driver, with this machine's real size."""

    def __init__(self, virtapi, read_only=False):
        share = float(os.environ.get("MODELSERVE_OS_LXD_SHARE", "1") or 1)
        pool = os.environ.get("MODELSERVE_OS_LXD_POOL", "default")
        self.vcpus, self.memory_mb, self.local_gb = host_resources(
            share, f"/var/lib/lxd/storage-pools/{pool}")
        super().__init__(virtapi, read_only)
        self.pool = pool
        self.capabilities = dict(self.capabilities, has_imagecache=True)
        self.host_status_base.update({
            "hypervisor_type": "lxd",
            "supported_instances": [(obj_fields.Architecture.X86_64, obj_fields.HVType.LXC,
                                     obj_fields.VMMode.EXE)],
        })

    # -- LXD helpers ---------------------------------------------------------------------
    def _ours(self):
        """{uuid: container name} of the containers this driver made."""
        found = {}
        for inst in lxdcli.query(lxdcli.p("/1.0/instances?recursion=1")) or []:
            uuid = (inst.get("config") or {}).get("user.nova.uuid")
            if uuid:
                found[uuid] = inst["name"]
        return found

    def _state(self, name, action, timeout=30, force=False):
        body = {"action": action, "timeout": timeout, "force": force}
        lxdcli.query(lxdcli.p(f"/1.0/instances/{name}/state"), "PUT", body, wait=True,
                     timeout=timeout + 120)

    def _ensure_image(self, context, image_meta):
        """The LXD alias of a Glance image, imported on first use (once per image id)."""
        image_id = image_meta.id
        if image_meta.obj_attr_is_set("disk_format") and image_meta.disk_format != DISK_FORMAT:
            raise exception.ImageUnacceptable(
                image_id=image_id,
                reason=f"disk_format {image_meta.disk_format!r}: the LXD host boots only "
                       f"LXD unified tarballs (disk_format {DISK_FORMAT!r})")
        alias = f"glance-{image_id}"
        with lockutils.lock(f"lxd-image-{image_id}", external=True,
                            lock_path=CONF.oslo_concurrency.lock_path):
            if lxdcli.query(lxdcli.p(f"/1.0/images/aliases/{alias}"), check=False):
                return alias
            cache = os.path.join(CONF.instances_path, "_lxd_images")
            os.makedirs(cache, exist_ok=True)
            path = os.path.join(cache, image_id)
            images.fetch(context, image_id, path)
            try:
                # a unified tarball's LXD fingerprint is its sha256: the same bytes under a
                # second Glance id (re-uploaded, copied) get an alias, not a refused import
                fingerprint = _sha256(path)
                if lxdcli.query(lxdcli.p(f"/1.0/images/{fingerprint}"), check=False):
                    lxdcli.lxc("image", "alias", "create", alias, fingerprint,
                               "--project", lxdcli.project())
                else:
                    lxdcli.lxc("image", "import", path, "--alias", alias,
                               "--project", lxdcli.project(), timeout=1800)
            finally:
                os.unlink(path)
            LOG.info("imported Glance image %s into LXD as %s", image_id, alias)
        return alias

    # -- Nova entry points -----------------------------------------------------------------
    def init_host(self, host):
        """Know the containers of a previous run again (Nova asks their state)."""
        super().init_host(host)
        for uuid, name in self._ours().items():
            self.instances[uuid] = fake.FakeInstance(name, self._power(name), uuid)

    def _power(self, name):
        inst = lxdcli.instance(name)
        if inst is None:
            return power_state.NOSTATE
        code = inst.get("status_code")
        return {RUNNING: power_state.RUNNING, STOPPED: power_state.SHUTDOWN}.get(
            code, power_state.NOSTATE)

    def get_info(self, instance, use_cache=True):
        name = self._ours().get(instance.uuid)
        if name is None:
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        return hardware.InstanceInfo(state=self._power(name))

    def list_instances(self):
        return list(self._ours().values())

    def list_instance_uuids(self):
        return list(self._ours())

    def instance_exists(self, instance):
        return instance.uuid in self._ours()

    def spawn(self, context, instance, image_meta, injected_files, admin_password,
              allocations, network_info=None, block_device_info=None, power_on=True,
              accel_info=None):
        """Import the image if new, create the container with Nova's NoCloud seed, start."""
        alias = self._ensure_image(context, image_meta)
        name = instance.name
        user_data = decode_user_data(instance.user_data)
        if _fault(SEED_FAULT):
            user_data = _seed_the_image_rejects(user_data)
        flavor = instance.flavor
        devices = {"root": {"type": "disk", "path": "/", "pool": self.pool}}
        for n, vif in enumerate(network_info or []):
            nic = {"type": "nic", "network": lxdcli.bridge(), "name": f"eth{n}",
                   "hwaddr": vif["address"]}
            v4 = [ip["address"] for ip in vif.fixed_ips() if ip["version"] == 4]
            if v4:
                nic["ipv4.address"] = v4[0]
            devices[f"eth{n}"] = nic
        body = {"name": name, "type": "container",
                "source": {"type": "image", "alias": alias},
                "profiles": ["default"],
                # not cloud-init.user-data: the image's templates would copy it into
                # nocloud-net/ with mode 0644, and user_data holds the seed's passwords
                "config": {"user.nova.uuid": instance.uuid,
                           "limits.cpu": str(flavor.vcpus),
                           "limits.memory": f"{flavor.memory_mb}MB"},
                "devices": devices}
        lxdcli.query(lxdcli.p("/1.0/instances"), "POST", body, wait=True, timeout=1800)
        try:
            self._push_seed(name, {
                "user-data": user_data,
                "meta-data": yaml.safe_dump(meta_data(instance), sort_keys=True),
                "network-config": yaml.safe_dump(network_config(network_info),
                                                 sort_keys=False),
                "vendor-data": "#cloud-config\n{}\n",
            })
            if power_on:
                self._state(name, "start")
        except Exception:
            lxdcli.lxc("delete", "--force", name, "--project", lxdcli.project(), check=False)
            raise
        flavor = instance.flavor
        self.resources.claim(vcpus=flavor.vcpus, mem=flavor.memory_mb, disk=flavor.root_gb)
        self.instances[instance.uuid] = fake.FakeInstance(
            name, power_state.RUNNING if power_on else power_state.SHUTDOWN, instance.uuid)
        LOG.info("server %s is container %s (image %s)", instance.uuid, name, alias)

    def _push_seed(self, name, files):
        """The NoCloud seed into the (stopped) container, root-only (it holds secrets)."""
        tmp = tempfile.mkdtemp(prefix="seed-")
        try:
            paths = []
            for fname, text in files.items():
                path = os.path.join(tmp, fname)
                with open(path, "w") as fh:
                    fh.write(text)
                paths.append(path)
            lxdcli.lxc("file", "push", "--project", lxdcli.project(), "-p", "--uid", "0",
                       "--gid", "0", "--mode", "0600", *paths, f"{name}{SEED_DIR}/")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def destroy(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, destroy_secrets=True):
        name = self._ours().get(instance.uuid)
        if name is not None:
            lxdcli.lxc("delete", "--force", name, "--project", lxdcli.project())
        if instance.uuid in self.instances:
            super().destroy(context, instance, network_info, block_device_info,
                            destroy_disks, destroy_secrets)

    def _name(self, instance):
        name = self._ours().get(instance.uuid)
        if name is None:
            raise exception.InstanceNotFound(instance_id=instance.uuid)
        return name

    def power_off(self, instance, timeout=0, retry_interval=0):
        name = self._name(instance)
        if self._power(name) == power_state.RUNNING:
            try:
                self._state(name, "stop", timeout=timeout or 0, force=not timeout)
            except lxdcli.LxdError:
                if not timeout:
                    raise
                self._state(name, "stop", force=True)
        if instance.uuid in self.instances:
            self.instances[instance.uuid].state = power_state.SHUTDOWN

    def power_on(self, context, instance, network_info, block_device_info=None,
                 accel_info=None, share_info=None):
        name = self._name(instance)
        if self._power(name) != power_state.RUNNING:
            self._state(name, "start")
        self.instances[instance.uuid] = fake.FakeInstance(name, power_state.RUNNING,
                                                          instance.uuid)

    def reboot(self, context, instance, network_info, reboot_type, block_device_info=None,
               bad_volumes_callback=None, accel_info=None, share_info=None):
        name = self._name(instance)
        if self._power(name) != power_state.RUNNING:
            self._state(name, "start")
        else:
            self._state(name, "restart", timeout=60, force=reboot_type.lower() == "hard")

    def snapshot(self, context, instance, image_id, update_task_state):
        """Publish the container and upload it (unified tarball) to the Glance image Nova
        created for the snapshot."""
        name = self._name(instance)
        update_task_state(task_state=task_states.IMAGE_PENDING_UPLOAD)
        alias = f"snap-{image_id}"
        tmp = tempfile.mkdtemp(prefix="snap-", dir=CONF.instances_path)
        proj = ["--project", lxdcli.project()]
        try:
            # a running container is published from a stateless snapshot of itself
            lxdcli.lxc("snapshot", name, f"nova-{image_id}", *proj)
            lxdcli.lxc("publish", f"{name}/nova-{image_id}", "--alias", alias, *proj,
                       timeout=3600)
            lxdcli.lxc("image", "export", alias, os.path.join(tmp, "image"), *proj,
                       timeout=3600)
            tarball = next(os.path.join(tmp, f) for f in os.listdir(tmp))
            self._drop_snapshot(name, image_id, alias)  # before Glance says "active"
            update_task_state(task_state=task_states.IMAGE_UPLOADING,
                              expected_state=task_states.IMAGE_PENDING_UPLOAD)
            meta = {"disk_format": DISK_FORMAT, "container_format": "bare",
                    "properties": {"hypervisor_type": "lxc"}}
            with open(tarball, "rb") as fh:
                data = fh
                if _fault(UPLOAD_FAULT):
                    data = _FailingUpload(fh, os.fstat(fh.fileno()).st_size // 2)
                images.IMAGE_API.update(context, image_id, meta, data, purge_props=False)
        finally:
            self._drop_snapshot(name, image_id, alias)
            shutil.rmtree(tmp, ignore_errors=True)
        LOG.info("snapshot of %s uploaded to Glance image %s", instance.uuid, image_id)

    def _drop_snapshot(self, name, image_id, alias):
        proj = ["--project", lxdcli.project()]
        lxdcli.lxc("delete", f"{name}/nova-{image_id}", *proj, check=False)
        lxdcli.lxc("image", "delete", alias, *proj, check=False)

    def manage_image_cache(self, context, all_instances):
        """Nova's periodic image-cache pass: drop imported images no container uses."""
        used = {inst.get("config", {}).get("volatile.base_image")
                for inst in lxdcli.query(lxdcli.p("/1.0/instances?recursion=1")) or []}
        for img in lxdcli.query(lxdcli.p("/1.0/images?recursion=1")) or []:
            aliases = [a["name"] for a in img.get("aliases") or []]
            if img["fingerprint"] not in used and any(a.startswith("glance-") for a in aliases):
                LOG.info("removing unused cached image %s (%s)", aliases, img["fingerprint"])
                lxdcli.lxc("image", "delete", img["fingerprint"], "--project",
                           lxdcli.project(), check=False)

    def get_host_uptime(self):
        with open("/proc/uptime") as fh:
            return f"up {float(fh.read().split()[0]):.0f} s"

    def get_available_resource(self, nodename):
        res = super().get_available_resource(nodename)
        res["cpu_info"] = json.dumps({"arch": "x86_64", "topology": {
            "cores": self.vcpus, "threads": 1, "sockets": 1}})
        return res


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _FailingUpload:
    """A file whose read fails (an I/O error, as a lost connection) after `limit` bytes."""

    def __init__(self, fh, limit):
        self._fh, self._left = fh, limit

    def read(self, size=-1):
        if self._left <= 0:
            raise OSError("snapshot upload broken off (fault-snapshot-upload)")
        chunk = self._fh.read(self._left if size is None or size < 0 else min(size, self._left))
        self._left -= len(chunk)
        return chunk

    def __iter__(self):
        while True:
            chunk = self.read(65536)
            if not chunk:
                return
            yield chunk

    def __getattr__(self, name):
        return getattr(self._fh, name)
