"""Bring a real OpenStack control plane up on loopback, and down again.

MariaDB and a private RabbitMQ node, then Keystone, Glance, Placement, Nova (API, conductor,
scheduler, and nova-compute on the LXD host: lxd_driver.py's servers are LXD system
containers) and Neutron (ML2 with an agentless mechanism driver, an L3 plugin whose floating
IPs go ACTIVE as LXD network forwards), and the seeded projects. Every step checks before
acting, so `up` after a crash or a SIGKILL of everything picks up where things are.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from localcloud.openstack import config
from localcloud.openstack.config import HOST, Layout, Ports
from localcloud.openstack.procs import Procs

log = logging.getLogger("openstack-harness")

RABBIT_NODE = "modelserve-os@localhost"
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
# daemons of older harnesses (the process-driver compute, the user-space floating-IP
# forwarder): stopped when a state dir that still runs them comes up
RETIRED = ("nova-compute", "fip-forwarder")


class HarnessError(RuntimeError):
    """A bring-up step failed; the message says which and where its log is."""


def _run(argv, env=None, timeout=600, what=None, cwd=None):
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise HarnessError(f"{what or argv[0]} failed (rc {proc.returncode}): "
                           + " | ".join(tail))
    return proc.stdout


def _wait(predicate, what, timeout, procs=None, name=None, interval=0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if procs and name and not procs.pid(name):
            raise HarnessError(f"{name} died during start-up; see {procs.logs / name}.log")
        time.sleep(interval)
    raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")


def _port_open(port, host=HOST):
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


class Harness:
    """One control plane, identified by its state directory."""

    def __init__(self, layout: Layout | None = None, ports: Ports | None = None):
        self.layout = layout or Layout()
        self.ports = ports or Ports()
        self.procs = Procs(self.layout.state)
        self.timings: dict[str, float] = {}
        self.compute_started: dict[str, float] = {}

    # ---------------------------------------------------------------- helpers
    @property
    def bin(self) -> Path:
        return self.layout.venv / "bin"

    def _env(self, name="") -> dict:
        env = config.service_env(self.layout, name)
        if name == "nova-compute-lxd":
            env["MODELSERVE_OS_STATE"] = str(self.layout.state)
        return env

    def _marker(self, step: str) -> Path:
        return self.layout.mysql / f".modelserve-{step}-{config.requirements_hash()}"

    def _timed(self, name, fn, *args):
        t0 = time.monotonic()
        result = fn(*args)
        self.timings[name] = round(time.monotonic() - t0, 2)
        log.info("%-22s %6.1fs", name, self.timings[name])
        return result

    # ---------------------------------------------------------------- venv
    def ensure_venv(self) -> None:
        """The pinned services venv, built once per requirements hash."""
        venv = self.layout.venv
        if (venv / ".complete").exists():
            return
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        python = shutil.which("python3", path="/usr/bin") or sys.executable
        _run([python, "-m", "venv", str(venv)], what="python3 -m venv")
        _run([str(venv / "bin/pip"), "install", "-q", "--no-deps", "-r",
              str(config.REQUIREMENTS)], timeout=1800,
             what="pip install -r requirements-openstack.txt")
        _run([str(venv / "bin/pip"), "check"], what="pip check of the services venv")
        (venv / ".complete").write_text(config.requirements_hash() + "\n")

    # ---------------------------------------------------------------- files
    def write_configs(self) -> None:
        """Render every config file and copy the paste/ini files the services ship."""
        pw = self.layout.secrets()
        for sub in ("keystone/fernet-keys", "keystone/credential-keys", "glance/images",
                    "glance/staging", "glance/tasks", "glance/lock", "nova/instances",
                    "nova/lock", "neutron/lock", "rabbitmq/log",
                    "nova-lxd/instances", "nova-lxd/lock", "lxc-conf"):
            (self.layout.state / sub).mkdir(parents=True, exist_ok=True)
        self.layout.state.chmod(0o700)
        for sub in ("keystone/fernet-keys", "keystone/credential-keys"):
            (self.layout.state / sub).chmod(0o700)
        self.changed: set[str] = set()
        for path, text in config.render(self.layout, self.ports, pw).items():
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_text() != text:
                existed = path.exists()
                path.write_text(text)
                path.chmod(0o600)
                if existed:  # a running service must restart to see it
                    self.changed.add(path.parent.name if path.parent.name != "ml2"
                                 else "neutron")
        shipped = self.layout.venv / "etc"
        for src, dst in (("nova/api-paste.ini", "nova/api-paste.ini"),
                         ("glance/glance-api-paste.ini", "glance/glance-api-paste.ini"),
                         ("neutron/api-paste.ini", "neutron/api-paste.ini")):
            shutil.copyfile(shipped / src, self.layout.etc / dst)

    # ---------------------------------------------------------------- MariaDB
    def mysql_up(self) -> None:
        """MariaDB on its own datadir, socket and loopback port; databases and one user."""
        d = self.layout.mysql
        sock = self.layout.state / "mysql.sock"
        if not (d / "mysql").is_dir():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            _run(["mariadb-install-db", f"--datadir={d}", "--user=root",
                  "--auth-root-authentication-method=socket", "--skip-test-db"],
                 what="mariadb-install-db")
        self.procs.start("mariadb", [
            "mariadbd", "--no-defaults", f"--datadir={d}", "--user=root",
            f"--port={self.ports.mysql}", f"--bind-address={HOST}", f"--socket={sock}",
            f"--pid-file={self.layout.state}/run/mariadbd.internal.pid", "--skip-log-bin",
            "--innodb-buffer-pool-size=128M", "--innodb-flush-log-at-trx-commit=0",
            "--max-connections=1000", "--skip-name-resolve", "--character-set-server=utf8mb4",
            "--innodb-log-file-size=64M",
        ])
        _wait(lambda: sock.exists() and _port_open(self.ports.mysql), "MariaDB", 60,
              self.procs, "mariadb")
        pw = self.layout.secrets()["db"]
        dbs = ("keystone", "glance", "placement", "nova_api", "nova", "nova_cell0", "neutron")
        sql = "".join(f"CREATE DATABASE IF NOT EXISTS {name};" for name in dbs) + (
            f"CREATE USER IF NOT EXISTS 'openstack'@'{HOST}' IDENTIFIED BY '{pw}';"
            f"ALTER USER 'openstack'@'{HOST}' IDENTIFIED BY '{pw}';"
            f"GRANT ALL PRIVILEGES ON *.* TO 'openstack'@'{HOST}';FLUSH PRIVILEGES;")
        _run(["mariadb", f"--socket={sock}", "-uroot", "-e", sql], what="MariaDB grants")

    # ---------------------------------------------------------------- RabbitMQ
    def rabbit_env(self) -> dict:
        r = self.layout.rabbit
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update({
            "HOME": str(r),
            "RABBITMQ_NODENAME": RABBIT_NODE,
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_NODE_PORT": str(self.ports.rabbit),
            "RABBITMQ_DIST_PORT": str(self.ports.rabbit_dist),
            "RABBITMQ_CONFIG_FILE": str(r / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(r / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(r / "mnesia"),
            "RABBITMQ_LOG_BASE": str(r / "log"),
            "RABBITMQ_PID_FILE": str(r / "beam.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS":
                "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def rabbitmqctl(self, *args, check=True, timeout=120):
        """rabbitmqctl against our node with our cookie (never the system node)."""
        argv = [str(RABBIT_BIN / "rabbitmqctl"), "-n", RABBIT_NODE, "-q", *args]
        if check:
            return _run(argv, env=self.rabbit_env(), timeout=timeout, what="rabbitmqctl")
        return subprocess.run(argv, env=self.rabbit_env(), capture_output=True, text=True,
                              timeout=timeout)

    def rabbit_up(self) -> None:
        """A private RabbitMQ node (own name, ports, cookie, data dir) and the services' user."""
        r = self.layout.rabbit
        cookie = r / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(os.urandom(16).hex())
            cookie.chmod(0o400)
        self.procs.start("rabbitmq", [str(RABBIT_BIN / "rabbitmq-server")],
                         env=self.rabbit_env(), cwd=str(r))
        _wait(lambda: _port_open(self.ports.rabbit), "RabbitMQ", 90, self.procs, "rabbitmq")
        self.rabbitmqctl("await_startup")
        pw = self.layout.secrets()["rabbit"]
        if self.rabbitmqctl("add_user", "openstack", pw, check=False).returncode != 0:
            self.rabbitmqctl("change_password", "openstack", pw)
        self.rabbitmqctl("set_permissions", "-p", "/", "openstack", ".*", ".*", ".*")

    # ---------------------------------------------------------------- schemas
    def _manage(self, *argv, what):
        return _run([str(self.bin / argv[0]), *argv[1:]], env=self._env(), what=what,
                    timeout=900)

    def db_sync(self) -> None:
        """Each service's schema, once per state dir and venv (markers in the datadir)."""
        etc = self.layout.etc
        pw = self.layout.secrets()
        db = f"mysql+pymysql://openstack:{pw['db']}@{HOST}:{self.ports.mysql}"
        rabbit = f"rabbit://openstack:{pw['rabbit']}@{HOST}:{self.ports.rabbit}/"
        kconf = ["--config-file", str(etc / "keystone/keystone.conf")]
        nconf = ["--config-file", str(etc / "nova/nova.conf")]

        def keystone():
            self._manage("keystone-manage", *kconf, "db_sync", what="keystone db_sync")
            self._manage("keystone-manage", *kconf, "fernet_setup", "--keystone-user", "root",
                         "--keystone-group", "root", what="keystone fernet_setup")
            self._manage("keystone-manage", *kconf, "credential_setup", "--keystone-user",
                         "root", "--keystone-group", "root", what="keystone credential_setup")
            url = f"http://{HOST}:{self.ports.keystone}/v3/"
            self._manage("keystone-manage", *kconf, "bootstrap", "--bootstrap-password",
                         pw["admin"], "--bootstrap-admin-url", url, "--bootstrap-internal-url",
                         url, "--bootstrap-public-url", url, "--bootstrap-region-id",
                         config.REGION, what="keystone bootstrap")

        def glance():
            self._manage("glance-manage", "--config-file", str(etc / "glance/glance-api.conf"),
                         "db_sync", what="glance-manage db_sync")

        def placement():
            self._manage("placement-manage", "--config-file",
                         str(etc / "placement/placement.conf"), "db", "sync",
                         what="placement-manage db sync")

        def nova():
            self._manage("nova-manage", *nconf, "api_db", "sync", what="nova api_db sync")
            out = self._manage("nova-manage", *nconf, "cell_v2", "list_cells",
                               what="nova list_cells")
            if " cell0 " not in out:
                self._manage("nova-manage", *nconf, "cell_v2", "map_cell0",
                             "--database_connection", f"{db}/nova_cell0",
                             what="nova map_cell0")
            if " cell1 " not in out:
                self._manage("nova-manage", *nconf, "cell_v2", "create_cell", "--name",
                             "cell1", "--database_connection", f"{db}/nova",
                             "--transport-url", rabbit, what="nova create_cell")
            self._manage("nova-manage", *nconf, "db", "sync", what="nova db sync")

        def neutron():
            self._manage("neutron-db-manage", "--config-file",
                         str(etc / "neutron/neutron.conf"), "--config-file",
                         str(etc / "neutron/plugins/ml2/ml2_conf.ini"), "upgrade", "heads",
                         what="neutron-db-manage upgrade heads")

        jobs = {"keystone": keystone, "glance": glance, "placement": placement,
                "nova": nova, "neutron": neutron}
        todo = {k: v for k, v in jobs.items() if not self._marker(f"db-{k}").exists()}
        with concurrent.futures.ThreadPoolExecutor(len(todo) or 1) as pool:
            futures = {pool.submit(fn): name for name, fn in todo.items()}
            for fut in concurrent.futures.as_completed(futures):
                fut.result()
                self._marker(f"db-{futures[fut]}").write_text("ok\n")

    # ---------------------------------------------------------------- services
    def _wsgi(self, name, module, port, threads=4):
        serve = str(config.HERE / "wsgi_serve.py")
        self.procs.start(name, [str(self.bin / "python"), serve, module, f"{HOST}:{port}",
                                str(threads)], env=self._env(name))

    def keystone_up(self) -> None:
        """Keystone first: every other service needs its service user to start."""
        if "keystone" in getattr(self, "changed", ()):
            self.procs.stop("keystone")
        self._wsgi("keystone", "keystone.wsgi.api", self.ports.keystone, threads=8)
        _wait(lambda: _http_ok(f"http://{HOST}:{self.ports.keystone}/v3"),
              f"keystone on :{self.ports.keystone}", 120, self.procs, "keystone")

    def services_up(self) -> None:
        """Start the other API servers and Nova's daemons (each only if not running; a
        service whose config changed since it started is restarted)."""
        p = self.ports
        for name in self.procs.names():
            if name.split("-")[0] in getattr(self, "changed", ()) or name in RETIRED:
                self.procs.stop(name)
        nconf = ["--config-file", str(self.layout.etc / "nova/nova.conf")]
        self._wsgi("glance", "glance.wsgi.api", p.glance)
        self._wsgi("placement", "placement.wsgi.api", p.placement)
        self._wsgi("nova-api", "nova.wsgi.osapi_compute", p.nova)
        self._wsgi("neutron", "neutron.wsgi.api", p.neutron)
        for daemon in ("nova-conductor", "nova-scheduler"):
            self.procs.start(daemon, [str(self.bin / daemon), *nconf], env=self._env(daemon))
        name = "nova-compute-lxd"
        if not self.procs.pid(name):
            self.compute_started[name] = time.time()
        self.procs.start(name, [str(self.bin / "python"), "-m",
                                "modelserve_os_plugins.nova_compute", *nconf,
                                "--config-file", str(self.layout.etc / "nova/nova-lxd.conf")],
                         env=self._env(name))
        for name, port in (("glance", p.glance), ("placement", p.placement),
                           ("nova-api", p.nova), ("neutron", p.neutron)):
            _wait(lambda port=port: _http_ok(f"http://{HOST}:{port}/"),
                  f"{name} on :{port}", 180, self.procs, name)

    def discover_hosts(self) -> None:
        """Wait for nova-compute to register, then map it into cell1. (A compute service of
        another host, from a state dir of an older harness, stays down: the scheduler skips
        it.)"""
        from localcloud.openstack import seed

        conn = seed.connect(self, admin=True)
        hosts = {config.LXD_HOST: "nova-compute-lxd"}

        def reported(host, name) -> bool:
            # a restarted compute's old record still says "up": wait for this process's report
            since = self.compute_started.get(name, 0.0) - 2.0
            for svc in conn.compute.services(binary="nova-compute", host=host):
                stamp = (svc.updated_at or "").replace("Z", "")
                if svc.state == "up" and stamp and datetime.fromisoformat(stamp).replace(
                        tzinfo=timezone.utc).timestamp() >= since:
                    return True
            return False

        for host, name in hosts.items():
            _wait(lambda host=host, name=name: reported(host, name),
                  f"{name} to register", 180, self.procs, name, 1.0)
        self._manage("nova-manage", "--config-file", str(self.layout.etc / "nova/nova.conf"),
                     "cell_v2", "discover_hosts", what="nova discover_hosts")
        _wait(lambda: {h.name for h in conn.compute.hypervisors()} >= set(hosts),
              "the hypervisors", 120, self.procs, "nova-compute")

    def lxd_up(self) -> None:
        """The LXD host's project and bridge, and the Glance base image's tarball."""
        from localcloud.openstack import lxdhost

        why = lxdhost.usable()
        if why:
            raise HarnessError(f"the LXD compute host cannot run here: {why}")
        try:
            lxdhost.ensure_project_and_bridge()
            self.base_tarball = lxdhost.base_tarball()
        except (lxdhost.LxdHostError, subprocess.SubprocessError) as exc:
            raise HarnessError(f"the LXD compute host: {exc}") from exc

    # ---------------------------------------------------------------- up / down
    def up(self) -> dict:
        """Everything, idempotently; returns the step timings."""
        from localcloud.openstack import seed

        t0 = time.monotonic()
        self._timed("venv", self.ensure_venv)
        self._timed("configs", self.write_configs)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for fut in [pool.submit(self._timed, "mariadb", self.mysql_up),
                        pool.submit(self._timed, "rabbitmq", self.rabbit_up)]:
                fut.result()
        self._timed("db-sync", self.db_sync)
        self._timed("keystone", self.keystone_up)
        self._timed("keystone-catalog", seed.register_services, self)
        self._timed("lxd-host", self.lxd_up)
        self._timed("services", self.services_up)
        self._timed("discover-hosts", self.discover_hosts)
        self._timed("seed", seed.seed_project, self)
        self._timed("seed-lxd", seed.seed_lxd, self, self.base_tarball)
        self.write_clouds_yaml()
        self.timings["total"] = round(time.monotonic() - t0, 2)
        return self.timings

    def down(self) -> list[str]:
        """Stop what `up` started (by PID file), and remove what the LXD host made."""
        stopped = []
        order = ["nova-compute-lxd", "nova-scheduler", "nova-conductor",
                 "nova-api", "neutron", "placement", "glance", "keystone"]
        for name in order + [n for n in self.procs.names()
                             if n not in order + ["rabbitmq", "mariadb"]]:
            if self.procs.stop(name):
                stopped.append(name)
        if self.procs.pid("rabbitmq"):
            self.rabbitmqctl("stop", check=False, timeout=60)
        for name in ("rabbitmq", "mariadb"):
            if self.procs.stop(name, timeout=30):
                stopped.append(name)
        stopped += self.lxd_down()
        return stopped

    def lxd_down(self) -> list[str]:
        """Remove what the LXD host made in LXD (containers, images, project, forwards,
        bridge)."""
        from localcloud.openstack import lxdhost

        if not shutil.which("lxc") or lxdhost.lxc("query", "/1.0", check=False,
                                                  timeout=30).returncode:
            return []
        return lxdhost.remove_all()

    def status(self) -> dict:
        """name → PID or None, for every daemon the harness knows."""
        names = ["mariadb", "rabbitmq", "keystone", "glance", "placement", "nova-api",
                 "nova-conductor", "nova-scheduler", "nova-compute-lxd", "neutron"]
        return {n: self.procs.pid(n) for n in names}

    def write_clouds_yaml(self) -> str:
        """clouds.yaml with the project cloud and its admin twin; returns the text."""
        pw = self.layout.secrets()
        auth = f"http://{HOST}:{self.ports.keystone}/v3"

        def entry(name, user, password, project):
            return (f"  {name}:\n    auth:\n      auth_url: {auth}\n      username: {user}\n"
                    f"      password: {password}\n      project_name: {project}\n"
                    f"      user_domain_name: Default\n      project_domain_name: Default\n"
                    f"    region_name: {config.REGION}\n    interface: public\n"
                    f"    identity_api_version: 3\n")

        text = ("clouds:\n" + entry(config.CLOUD, "modelserve", pw["modelserve"], "modelserve")
                + entry(config.CLOUD + "-admin", "admin", pw["admin"], "admin"))
        # the LXD host's project (its servers are containers): where rollout deploys
        text += entry(config.CLOUD + "-lxd", "modelserve", pw["modelserve"],
                      config.LXD_PROJECT_OS)
        path = self.layout.clouds_yaml
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return text
