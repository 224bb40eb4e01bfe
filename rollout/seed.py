"""Render the per-instance NoCloud seed (nocloud/ templates): meta-data and #cloud-config.

The user-data only writes /etc/modelserve/instance.env (mode 0600) — role, colour, release,
deploy id, and broker/result-backend credentials generated fresh for every deploy. Values are
checked against a strict alphabet, so nothing a caller passes can break out of the KEY=VALUE
line or the YAML document.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from string import Template

from app.release_id import RULE as RELEASE_RULE
from app.release_id import is_release_id
from rollout import redact

NOCLOUD_DIR = Path(__file__).resolve().parent.parent / "nocloud"
INSTANCE_ENV_PATH = "/etc/modelserve/instance.env"
BROKER_VHOST = "modelserve"
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
    broker_bind: str = "127.0.0.1"  # a front with worker instances: 0.0.0.0
    port: int = 8080
    worker_concurrency: int = 2

    def values(self) -> dict[str, str]:
        """The instance.env keys (the app contract), validated."""
        c = self.credentials
        vals = {
            "MODELSERVE_ROLE": self.role,
            "MODELSERVE_COLOUR": self.colour,
            "MODELSERVE_RELEASE": self.release,
            "MODELSERVE_DEPLOY_ID": self.deploy_id,
            "MODELSERVE_ENV": self.env,
            "MODELSERVE_BROKER_USER": c.broker_user,
            "MODELSERVE_BROKER_PASSWORD": c.broker_password,
            "MODELSERVE_BROKER_VHOST": BROKER_VHOST,
            "MODELSERVE_BROKER_URL": (
                f"amqp://{c.broker_user}:{c.broker_password}@{self.broker_host}:5672/"
                f"{BROKER_VHOST}"
            ),
            "MODELSERVE_REDIS_PASSWORD": c.redis_password,
            "MODELSERVE_RESULT_URL": f"redis://:{c.redis_password}@{self.broker_host}:6379/0",
            "MODELSERVE_BROKER_BIND": self.broker_bind,
            "MODELSERVE_PORT": str(self.port),
            "MODELSERVE_WORKER_CONCURRENCY": str(self.worker_concurrency),
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
        return vals


def render_instance_env(params: SeedParams) -> str:
    """The content of /etc/modelserve/instance.env (KEY=VALUE lines)."""
    tmpl = Template((NOCLOUD_DIR / "instance.env.tmpl").read_text())
    return tmpl.substitute(params.values())


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
