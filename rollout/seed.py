"""Render the per-instance NoCloud seed (nocloud/ templates): meta-data and #cloud-config.

The user-data writes /etc/modelserve/instance.env (mode 0600) — role, colour, release,
deploy id, and broker/result-backend credentials generated fresh for every deploy — and, for a
release with worker instances, the deploy's TLS material under /etc/modelserve/tls/ (root,
0600; written before instance.env, which first boot waits for): the CA certificate on every
instance, the front's certificate and key on the front only (rollout/tls.py). Values are
checked against a strict alphabet, so nothing a caller passes can break out of the KEY=VALUE
line or the YAML document.

The broker path with worker instances (image-scripts/files/modelserve-firstboot applies it):
the front's RabbitMQ listens TLS on 5671 and plain on 127.0.0.1:5672 only (its own web and
worker), its Redis TLS on 6380 only (plain port off); an nftables table lets only
MODELSERVE_BROKER_PEERS (the workers' fixed addresses) and loopback reach those ports. Workers
connect with amqps:// and rediss:// and verify the front against the deploy's CA (and its
address, when the certificate names it). A front without workers keeps both on loopback,
plain, as before.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from string import Template

from app.release_id import RULE as RELEASE_RULE
from app.release_id import is_release_id
from rollout import redact
from rollout.tls import TLSMaterial

NOCLOUD_DIR = Path(__file__).resolve().parent.parent / "nocloud"
INSTANCE_ENV_PATH = "/etc/modelserve/instance.env"
BROKER_VHOST = "modelserve"
TLS_DIR = "/etc/modelserve/tls"
#: where first boot copies the CA for the service user (the app's MODELSERVE_TLS_CA)
RUN_CA_PATH = "/run/modelserve/ca.pem"
AMQP_PORT, AMQPS_PORT, REDIS_PORT, REDIS_TLS_PORT = 5672, 5671, 6379, 6380
_SAFE = re.compile(r"^[A-Za-z0-9._:/@=+\-]*$")


@dataclass(frozen=True)
class Credentials:
    """Broker and result-backend secrets shared by one release's front and its workers."""

    broker_user: str
    broker_password: str
    redis_password: str

    @classmethod
    def generate(cls) -> Credentials:
        """Fresh random credentials (``secrets``), one set per deploy."""
        return cls(
            broker_user=f"ms-{secrets.token_hex(4)}",
            broker_password=secrets.token_hex(24),
            redis_password=secrets.token_hex(24),
        )

    def __post_init__(self) -> None:
        redact.register(self.broker_password, self.redis_password)  # masked in every log line

    def __repr__(self) -> str:  # never print secrets in logs or tracebacks
        return f"Credentials(broker_user={self.broker_user!r}, ...)"


@dataclass(frozen=True)
class SeedParams:
    """Who an instance is and where its broker lives."""

    role: str  # front | worker
    colour: str  # blue | green
    release: str
    deploy_id: str
    env: str
    credentials: Credentials
    broker_host: str = "127.0.0.1"  # a worker: its front's address
    broker_bind: str = "127.0.0.1"  # a front with worker instances: 0.0.0.0 (TLS ports only)
    port: int = 8080
    worker_concurrency: int = 2
    web_processes: int = 2  # a front's waitress processes (app.serve.serve_processes)
    #: a front with workers: the addresses allowed to reach its TLS ports (empty: not known
    #: beforehand on this cloud, the cloud's own filtering applies: ``any``)
    broker_peers: tuple[str, ...] = ()
    tls: TLSMaterial | None = None  # the deploy's CA (+ the front's cert and key)

    @property
    def exposed(self) -> bool:
        """A front whose broker and Redis worker instances reach (over TLS)."""
        return self.role == "front" and self.broker_bind != "127.0.0.1"

    def _urls(self) -> tuple[str, str]:
        c = self.credentials
        user = f"{c.broker_user}:{c.broker_password}"
        if self.role == "worker" and self.tls is not None:
            return (f"amqps://{user}@{self.broker_host}:{AMQPS_PORT}/{BROKER_VHOST}",
                    f"rediss://:{c.redis_password}@{self.broker_host}:{REDIS_TLS_PORT}/0")
        broker = f"amqp://{user}@{self.broker_host}:{AMQP_PORT}/{BROKER_VHOST}"
        if self.exposed:  # Redis has no plain port then: its own clients use TLS on loopback
            return broker, f"rediss://:{c.redis_password}@127.0.0.1:{REDIS_TLS_PORT}/0"
        return broker, f"redis://:{c.redis_password}@{self.broker_host}:{REDIS_PORT}/0"

    def tls_values(self) -> dict[str, str]:
        """The optional instance.env keys of the TLS broker path (none without it)."""
        if self.exposed:
            if self.tls is None:
                raise ValueError("seed: a front with worker instances needs the deploy's TLS "
                                 "material (broker_bind 0.0.0.0 without tls)")
            peers = []
            for peer in self.broker_peers:
                try:
                    peers.append(str(ipaddress.IPv4Address(peer)))
                except ValueError:
                    raise ValueError(f"seed: broker peer {peer!r} is not an IPv4 address"
                                     ) from None
            return {"MODELSERVE_BROKER_PEERS": ",".join(peers) or "any",
                    "MODELSERVE_TLS_CA": RUN_CA_PATH, "MODELSERVE_TLS_CHECK_HOSTNAME": "1"}
        if self.role == "worker" and self.tls is not None:
            check = self.tls.server_ip is not None and self.tls.server_ip == self.broker_host
            return {"MODELSERVE_TLS_CA": RUN_CA_PATH,
                    "MODELSERVE_TLS_CHECK_HOSTNAME": "1" if check else "0"}
        return {}

    def tls_files(self) -> dict[str, str]:
        """Path -> PEM text the seed writes under TLS_DIR (root, 0600)."""
        if self.tls is None or not (self.exposed or self.role == "worker"):
            return {}
        files = {f"{TLS_DIR}/ca.pem": self.tls.ca_pem}
        if self.exposed:
            files[f"{TLS_DIR}/server.pem"] = self.tls.cert_pem
            files[f"{TLS_DIR}/server.key"] = self.tls.key_pem
        return files

    def values(self) -> dict[str, str]:
        """The instance.env keys (the app contract), validated."""
        c = self.credentials
        broker_url, result_url = self._urls()
        vals = {
            "MODELSERVE_ROLE": self.role,
            "MODELSERVE_COLOUR": self.colour,
            "MODELSERVE_RELEASE": self.release,
            "MODELSERVE_DEPLOY_ID": self.deploy_id,
            "MODELSERVE_ENV": self.env,
            "MODELSERVE_BROKER_USER": c.broker_user,
            "MODELSERVE_BROKER_PASSWORD": c.broker_password,
            "MODELSERVE_BROKER_VHOST": BROKER_VHOST,
            "MODELSERVE_BROKER_URL": broker_url,
            "MODELSERVE_REDIS_PASSWORD": c.redis_password,
            "MODELSERVE_RESULT_URL": result_url,
            "MODELSERVE_BROKER_BIND": self.broker_bind,
            "MODELSERVE_PORT": str(self.port),
            "MODELSERVE_WORKER_CONCURRENCY": str(self.worker_concurrency),
            "MODELSERVE_WEB_PROCESSES": str(self.web_processes),
        }
        if self.role not in ("front", "worker"):
            raise ValueError(f"seed: role must be front or worker, not {self.role!r}")
        if self.colour not in ("blue", "green"):
            raise ValueError(f"seed: colour must be blue or green, not {self.colour!r}")
        if not is_release_id(self.release):
            raise ValueError(f"seed: MODELSERVE_RELEASE {self.release!r}: {RELEASE_RULE}")
        for key, value in vals.items():
            if not value or not _SAFE.match(value):
                raise ValueError(f"seed: {key} is empty or has characters outside {_SAFE.pattern}")
        vals.update(self.tls_values())  # validated there (addresses, fixed paths)
        return vals


def render_instance_env(params: SeedParams) -> str:
    """The content of /etc/modelserve/instance.env (KEY=VALUE lines): the template's keys,
    then the TLS broker path's optional keys."""
    text = (NOCLOUD_DIR / "instance.env.tmpl").read_text()
    out = Template(text).substitute(params.values())
    extra = {k: v for k, v in params.tls_values().items() if "${" + k + "}" not in text}
    return out + "".join(f"{k}={v}\n" for k, v in extra.items())


def _block_dumper():
    """A yaml SafeDumper writing multi-line strings as ``|`` blocks, so a seed reads like the
    file it writes (yaml is imported here: rollback and status never render a seed)."""
    import yaml

    class _BlockDumper(yaml.SafeDumper):
        pass

    _BlockDumper.add_representer(
        str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                             style="|" if "\n" in s else None))
    return _BlockDumper


def render_user_data(params: SeedParams) -> str:
    """The #cloud-config user-data that writes instance.env (mode 0600)."""
    import yaml

    doc = yaml.safe_load((NOCLOUD_DIR / "user-data.yaml").read_text())
    for entry in doc["write_files"]:
        if entry["path"] == INSTANCE_ENV_PATH:
            entry["content"] = render_instance_env(params)
    # the TLS files first: first boot starts as soon as instance.env exists
    tls = [{"path": path, "owner": "root:root", "permissions": "0600", "content": pem}
           for path, pem in params.tls_files().items()]
    doc["write_files"] = tls + doc["write_files"]
    body = yaml.dump(doc, Dumper=_block_dumper(), sort_keys=False, width=1000)
    return "#cloud-config\n" + body


def render_meta_data(instance_id: str, hostname: str) -> str:
    """NoCloud meta-data (instance-id, local-hostname) for clouds that take a seed ISO/dir."""
    for name, value in (("instance-id", instance_id), ("hostname", hostname)):
        if not value or not _SAFE.match(value):
            raise ValueError(f"seed: {name} {value!r} is empty or unsafe")
    tmpl = Template((NOCLOUD_DIR / "meta-data.tmpl").read_text())
    return tmpl.substitute(INSTANCE_ID=instance_id, HOSTNAME=hostname)


def parse_user_data(user_data: str) -> dict[str, str]:
    """Decode a rendered seed back to its instance.env keys (tests, the OpenStack tier)."""
    import yaml

    doc = yaml.safe_load(user_data)
    for entry in doc.get("write_files", []):
        if entry.get("path") == INSTANCE_ENV_PATH:
            return parse_env(entry.get("content", ""))
    raise ValueError(f"seed does not write {INSTANCE_ENV_PATH}")


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines (comments and blanks ignored) to a dict."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out
