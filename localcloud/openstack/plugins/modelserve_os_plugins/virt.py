"""A Nova virt driver that realises each server as the modelserve app, run as local processes.

Nova's fake driver boots nothing. This subclass keeps all of its bookkeeping and, for a
server whose user_data is a modelserve NoCloud seed, starts the real app the way the image's
units would: the web process on the server's (loopback) fixed IP and a Celery worker, with
a Redis of the server's own (front role). RabbitMQ is one node run by the harness; each
release gets its own vhost and user, created from the seed's credentials, just as the
image's first-boot unit does on a front. Servers without a seed stay plain fakes.

Configured by environment variables set by the harness on nova-compute:
MODELSERVE_OS_STATE (instances/<uuid>/ live there), MODELSERVE_OS_APP_ROOT and
MODELSERVE_OS_APP_PYTHON (where `python -m app.serve` runs), MODELSERVE_OS_RABBIT_NODE,
MODELSERVE_OS_RABBIT_PORT.

A stand-in image may carry ``modelserve_standin_behaviour`` (``fail N`` | ``slow N`` |
``flip``): its front's web process is then ``python -m localcloud.openstack.behave`` (the
real ``app.serve`` with that behaviour hooked in, see behave.py) -- the tier's counterpart of
the LXD stand-in image's /opt/standin files.
"""

import base64
import binascii
import gzip
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse

import yaml
from nova.virt import fake
from oslo_log import log as logging

LOG = logging.getLogger(__name__)
INSTANCE_ENV = "/etc/modelserve/instance.env"
BEHAVIOUR_PROPERTY = "modelserve_standin_behaviour"


def _decode_user_data(user_data):
    """Nova stores user_data base64-encoded; return the text, or None."""
    if not user_data:
        return None
    try:
        raw = base64.b64decode(user_data)
    except (binascii.Error, ValueError):
        return None
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", "replace")


def instance_env_from_seed(text):
    """The KEY=VALUE lines the seed writes to /etc/modelserve/instance.env, or None."""
    if not text or not text.startswith("#cloud-config"):
        return None
    doc = yaml.safe_load(text) or {}
    for item in doc.get("write_files") or []:
        if item.get("path") != INSTANCE_ENV:
            continue
        content = item.get("content", "")
        encoding = (item.get("encoding") or "").lower()
        if encoding in ("b64", "base64"):
            content = base64.b64decode(content).decode()
        elif encoding in ("gz+b64", "gzip+base64", "gz+base64", "gzip+b64"):
            content = gzip.decompress(base64.b64decode(content)).decode()
        env = {}
        for line in content.splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip().strip("'\"")
        return env
    return None


class ProcessDriver(fake.FakeDriverWithoutFakeNodes):
    """FakeDriver whose servers run the modelserve app on their fixed IP.

    The base keeps one stable node identity (compute_id in state_path), so nova-compute can
    be restarted; the servers it knows are reloaded from instances/<uuid>/ at start-up, and
    their processes restarted if they died with the previous nova-compute's session.
    """

    vcpus = 16
    memory_mb = 32768
    local_gb = 1024

    def __init__(self, virtapi, read_only=False):
        super().__init__(virtapi, read_only)
        self.state = os.environ.get("MODELSERVE_OS_STATE", "/var/tmp/modelserve-openstack")
        self.app_root = os.environ.get("MODELSERVE_OS_APP_ROOT", "")
        self.app_python = os.environ.get("MODELSERVE_OS_APP_PYTHON", "")
        self.rabbit_node = os.environ.get("MODELSERVE_OS_RABBIT_NODE", "")
        self.rabbit_port = os.environ.get("MODELSERVE_OS_RABBIT_PORT", "5672")

    # -- Nova entry points -------------------------------------------------------------
    def init_host(self, host):
        """Reload the servers of a previous run (and restart their processes if dead)."""
        super().init_host(host)
        root = os.path.join(self.state, "instances")
        for uuid in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            record = os.path.join(root, uuid, "server.json")
            if not os.path.exists(record):
                continue
            with open(record) as fh:
                info = json.load(fh)
            self.instances[uuid] = fake.FakeInstance(info["name"], fake.power_state.RUNNING,
                                                     uuid)
            if info.get("env") and not self._running(uuid):
                try:
                    self._start_app(uuid, info["env"], info["ip"], info.get("behaviour", ""))
                except Exception:  # noqa: BLE001 - the health gate will say why
                    LOG.exception("could not restart the app of server %s", uuid)

    def spawn(self, context, instance, image_meta, injected_files, admin_password,
              allocations, network_info=None, block_device_info=None, power_on=True,
              accel_info=None):
        """Record the fake instance, then start the app if the server carries a seed."""
        super().spawn(context, instance, image_meta, injected_files, admin_password,
                      allocations, network_info, block_device_info, power_on, accel_info)
        env = instance_env_from_seed(_decode_user_data(instance.user_data))
        if env is not None:  # a real instance's hostname is its name: workers report it
            env.setdefault("MODELSERVE_INSTANCE_NAME", instance.display_name or instance.uuid)
        ips = [ip["address"] for vif in (network_info or []) for ip in vif.fixed_ips()
               if ip["version"] == 4]
        behaviour = dict(instance.system_metadata or {}).get(f"image_{BEHAVIOUR_PROPERTY}", "")
        os.makedirs(self._dir(instance.uuid), exist_ok=True)
        record = os.path.join(self._dir(instance.uuid), "server.json")
        with open(os.open(record, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            json.dump({"name": instance.name, "env": env, "ip": ips[0] if ips else None,
                       "behaviour": behaviour}, fh)
        if env is None or not ips:
            LOG.info("server %s has no modelserve seed or no IPv4: plain fake", instance.uuid)
            return
        try:
            self._write_release_file(instance)
            self._start_app(instance.uuid, env, ips[0], behaviour)
        except Exception:  # the server still exists; its health gate will say why
            LOG.exception("could not start the app for server %s", instance.uuid)

    def destroy(self, context, instance, network_info, block_device_info=None,
                destroy_disks=True, destroy_secrets=True):
        """Stop the server's processes, drop a front's broker account, then forget it."""
        self._stop_app(instance.uuid)
        self._drop_rabbit_account(instance.uuid)
        shutil.rmtree(self._dir(instance.uuid), ignore_errors=True)
        super().destroy(context, instance, network_info, block_device_info,
                        destroy_disks, destroy_secrets)

    # -- the app as processes ------------------------------------------------------------
    def _dir(self, uuid):
        return os.path.join(self.state, "instances", uuid)

    def _write_release_file(self, instance):
        """The image's RELEASE.json, as the bake writes it into a real image, from Nova's copy
        of the Glance image properties (system_metadata ``image_<property>``). An image with
        no ``modelserve_release`` gets none: /version then says ``"image": null``."""
        sysmeta = dict(instance.system_metadata or {})

        def prop(key):
            return sysmeta.get(f"image_modelserve_{key}", "")

        def num(key):
            try:
                return float(prop(key))
            except ValueError:
                return None

        if not prop("release"):
            return
        doc = {"release": prop("release"), "git_sha": prop("git_sha"),
               "app_version": prop("app_version"), "model_sha256": prop("model_sha256"),
               "model_accuracy": num("model_accuracy"), "accuracy_floor": num("accuracy_floor"),
               "provenance": prop("provenance"), "built_at": prop("built_at")}
        path = os.path.join(self._dir(instance.uuid), "RELEASE.json")
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)

    def _start_app(self, uuid, seed_env, fixed_ip, behaviour=""):
        if not (self.app_root and self.app_python and os.path.isdir(
                os.path.join(self.app_root, "app"))):
            LOG.warning("MODELSERVE_OS_APP_ROOT/APP_PYTHON not usable: %s runs no app", uuid)
            return
        idir = self._dir(uuid)
        os.makedirs(idir, exist_ok=True)
        env = dict(seed_env)
        role = env.get("MODELSERVE_ROLE", "front")
        broker = urllib.parse.urlsplit(env.get("MODELSERVE_BROKER_URL", ""))
        user = urllib.parse.unquote(broker.username or "")
        password = urllib.parse.unquote(broker.password or "")
        vhost = "ms-" + (user or uuid)
        if role == "front":
            self._rabbit_account(user, password, vhost)
        env["MODELSERVE_BROKER_URL"] = "amqp://{}:{}@127.0.0.1:{}/{}".format(
            urllib.parse.quote(user, safe=""), urllib.parse.quote(password, safe=""),
            self.rabbit_port, urllib.parse.quote(vhost, safe=""))
        # the harness's RabbitMQ and these Redis processes are plain: the seed's TLS broker
        # path (amqps/rediss with the deploy's CA, --workers) is what the image applies
        for key in ("MODELSERVE_TLS_CA", "MODELSERVE_TLS_CHECK_HOSTNAME"):
            env.pop(key, None)
        result = urllib.parse.urlsplit(env.get("MODELSERVE_RESULT_URL", ""))
        if result.scheme == "rediss":
            result = result._replace(scheme="redis")
            env["MODELSERVE_RESULT_URL"] = result.geturl()
        if role == "front" and result.hostname:
            redis_pw = urllib.parse.unquote(result.password or "")
            self._start_redis(idir, fixed_ip, result.port or 6379, redis_pw)
            env["MODELSERVE_RESULT_URL"] = result._replace(
                netloc=f":{urllib.parse.quote(redis_pw, safe='')}@{fixed_ip}:"
                       f"{result.port or 6379}").geturl()
        env["MODELSERVE_HOST"] = fixed_ip
        env.setdefault("MODELSERVE_PORT", "8080")
        env["MODELSERVE_WORKER_CONCURRENCY"] = os.environ.get(
            "MODELSERVE_OS_WORKER_CONCURRENCY", env.get("MODELSERVE_WORKER_CONCURRENCY", "1"))
        env_path = os.path.join(idir, "instance.env")
        with open(os.open(env_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            fh.writelines(f"{k}={v}\n" for k, v in sorted(env.items()))
        proc_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("OS_", "PYTHONPATH", "VIRTUAL_ENV"))}
        proc_env.update({"MODELSERVE_INSTANCE_ENV": env_path, "PYTHONUNBUFFERED": "1",
                         "MODELSERVE_RELEASE_FILE": os.path.join(idir, "RELEASE.json")})
        web, web_env = "app.serve", proc_env
        if behaviour:  # a stand-in image's behaviour: the same app.serve, hooked (behave.py)
            web = "localcloud.openstack.behave"
            web_env = dict(proc_env, MODELSERVE_STANDIN_BEHAVIOUR=behaviour)
        mods = ["app.worker"] + ([web] if role == "front" else [])
        for mod in mods:
            name, env_of = ("serve", web_env) if mod == web else (mod.split(".")[1], proc_env)
            self._launch(idir, name, [self.app_python, "-m", mod], cwd=self.app_root, env=env_of)
        LOG.info("server %s: %s running %s on %s%s", uuid, role, mods, fixed_ip,
                 f" (stand-in behaviour {behaviour!r})" if behaviour else "")

    def _launch(self, idir, name, argv, cwd=None, env=None):
        log = open(os.path.join(idir, f"{name}.log"), "ab")
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        with open(os.path.join(idir, f"{name}.pid"), "w") as fh:
            fh.write(str(proc.pid))
        pids = os.path.join(idir, "pids.json")
        known = {}
        if os.path.exists(pids):
            with open(pids) as fh:
                known = json.load(fh)
        # PID + start time: a PID recycled after a SIGKILLed session is never mistaken for ours
        known[name] = [proc.pid, _start_time(proc.pid)]
        with open(pids, "w") as fh:
            json.dump(known, fh)

    def _start_redis(self, idir, ip, port, password):
        conf = os.path.join(idir, "redis.conf")
        with open(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            fh.write(f"bind {ip}\nport {port}\nrequirepass {password}\nsave \"\"\n"
                     f"appendonly no\ndir {idir}\ndaemonize no\nprotected-mode no\n")
        self._launch(idir, "redis", [shutil.which("redis-server") or "redis-server", conf])

    def _rabbitmqctl(self, *args, check=True):
        ctl = os.environ.get("MODELSERVE_OS_RABBITMQCTL", "/usr/lib/rabbitmq/bin/rabbitmqctl")
        return subprocess.run([ctl, "-n", self.rabbit_node, "-q", *args],
                              check=check, capture_output=True, text=True, timeout=60)

    def _rabbit_account(self, user, password, vhost):
        """Create the release's broker user and vhost (what the first-boot unit does)."""
        if not (user and self.rabbit_node):
            return
        self._rabbitmqctl("add_vhost", vhost, check=False)
        if self._rabbitmqctl("add_user", user, password, check=False).returncode != 0:
            self._rabbitmqctl("change_password", user, password)
        self._rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")

    def _drop_rabbit_account(self, uuid):
        record = os.path.join(self._dir(uuid), "server.json")
        try:
            with open(record) as fh:
                env = json.load(fh).get("env") or {}
        except (OSError, ValueError):
            return
        if env.get("MODELSERVE_ROLE", "front") != "front" or not self.rabbit_node:
            return
        user = urllib.parse.unquote(
            urllib.parse.urlsplit(env.get("MODELSERVE_BROKER_URL", "")).username or "")
        if user:
            self._rabbitmqctl("delete_vhost", "ms-" + user, check=False)
            self._rabbitmqctl("delete_user", user, check=False)

    def _running(self, uuid):
        pids_file = os.path.join(self._dir(uuid), "pids.json")
        if not os.path.exists(pids_file):
            return False
        with open(pids_file) as fh:
            return all(_alive(*p) for p in json.load(fh).values())

    def _stop_app(self, uuid):
        pids_file = os.path.join(self._dir(uuid), "pids.json")
        if not os.path.exists(pids_file):
            return
        with open(pids_file) as fh:
            entries = [p for p in json.load(fh).values() if _alive(*p)]
        for pid, _start in entries:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(*p) for p in entries):
            time.sleep(0.2)
        for pid, start in entries:
            if _alive(pid, start):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        os.unlink(pids_file)


def _start_time(pid):
    """Field 22 of /proc/PID/stat, or None when gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _alive(pid, start=None):
    """True if PID runs, is not a zombie and (when given) started when we recorded."""
    now = _start_time(pid)
    return now is not None and (start is None or now == start)
