"""Configuration from the environment and the instance config file the cloud-init seed writes.

Precedence: environment variables, then the instance file (default /etc/modelserve/instance.env,
overridable with MODELSERVE_INSTANCE_ENV), then defaults. A missing or malformed key raises
ConfigError whose message names the key; entry points turn it into one line and exit 2.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from app.identity import DEFAULT_RELEASE_FILE
from app.release_id import RULE as RELEASE_RULE
from app.release_id import is_release_id

DEFAULT_INSTANCE_ENV = "/etc/modelserve/instance.env"
ROLES = ("front", "worker")
COLOURS = ("blue", "green", "none")
_LINE = re.compile(r"^\s*(?:export\s+)?([A-Z][A-Z0-9_]*)\s*=\s*(.*?)\s*$")


class ConfigError(Exception):
    """A configuration key is missing or malformed; the message names it."""


def read_env_file(path: Path) -> dict[str, str]:
    """Parse KEY=VALUE lines (optional quotes, # comments). Malformed lines are errors."""
    values: dict[str, str] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return values
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read instance config: {exc.strerror}") from exc
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        match = _LINE.match(raw)
        if not match:
            raise ConfigError(f"{path}:{lineno}: malformed line (expected KEY=VALUE)")
        key, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def _int(src: Mapping[str, str], key: str, default: int, lo: int, hi: int) -> int:
    raw = src.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r}: must be an integer") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{key}={value}: must be between {lo} and {hi}")
    return value


def _float(src: Mapping[str, str], key: str, default: float, lo: float, hi: float) -> float:
    raw = src.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r}: must be a number") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{key}={value}: must be between {lo} and {hi}")
    return value


def _choice(src: Mapping[str, str], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = src.get(key) or default
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(choices)}")
    return value


def _url(src: Mapping[str, str], key: str, schemes: tuple[str, ...]) -> str:
    value = src.get(key)
    if not value:
        raise ConfigError(f"{key} is required (set it in the environment or the instance config)")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"{key}: not a valid URL") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(f"{key}: must be a {'/'.join(schemes)} URL with a host")
    return value


@dataclass(frozen=True)
class Config:
    """Everything a web or worker process needs; built by load_config()."""

    broker_url: str
    result_url: str
    role: str = "front"
    colour: str = "none"
    release: str = "dev"
    deploy_id: str = ""
    env: str = "dev"
    host: str = "0.0.0.0"
    port: int = 8080
    web_threads: int = 32
    web_processes: int = 1
    worker_concurrency: int = 2
    max_batch_rows: int = 10_000
    max_body_bytes: int = 1024 * 1024
    predict_timeout: float = 10.0
    parse_bytes: int = 8 * 1024 * 1024
    connection_limit: int = 256
    client_timeout: float = 15.0
    drain_seconds: float = 25.0
    async_queue_max: int = 1000
    async_expires: float = 600.0
    async_inflight: int = 2
    async_busy_share: float = 0.1
    async_nice: int = 10
    dispatch_threads: int = 2
    batch_rows: int = 512
    bundle_dir: str = ""
    release_file: str = DEFAULT_RELEASE_FILE  # the image's identity (app/identity.py)
    instance_name: str = ""  # this instance's name (default: the hostname); names the worker
    #: the CA that amqps:// and rediss:// peers are verified against (the deploy's own CA,
    #: delivered by the seed), and whether the server's certificate must name its address
    tls_ca: str = ""
    tls_check_hostname: bool = True
    source: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def public(self) -> dict[str, str]:
        """Instance identity for /version (no credentials)."""
        return {"release": self.release, "colour": self.colour, "role": self.role,
                "deploy_id": self.deploy_id, "env": self.env}


def _tls_ca(src: Mapping[str, str], urls: tuple[str, ...]) -> str:
    """MODELSERVE_TLS_CA: required (a readable file) when a URL asks for TLS."""
    path = src.get("MODELSERVE_TLS_CA", "")
    tls = [u.split(":", 1)[0] for u in urls if u.startswith(("amqps:", "rediss:"))]
    if not path:
        if tls:
            raise ConfigError(f"MODELSERVE_TLS_CA is required: {' and '.join(tls)} URLs are "
                              "verified against the deploy's CA")
        return ""
    try:
        Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"MODELSERVE_TLS_CA={path}: cannot read it ({exc.strerror})") from None
    return path


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """Merge the instance file and the environment into a validated Config."""
    environ = os.environ if environ is None else environ
    path = Path(environ.get("MODELSERVE_INSTANCE_ENV", DEFAULT_INSTANCE_ENV))
    src: dict[str, str] = {**read_env_file(path), **{k: v for k, v in environ.items()
                                                     if k.startswith("MODELSERVE_")}}
    release = src.get("MODELSERVE_RELEASE") or "dev"
    if not is_release_id(release):
        raise ConfigError(f"MODELSERVE_RELEASE={release!r}: {RELEASE_RULE}")
    broker_url = _url(src, "MODELSERVE_BROKER_URL", ("amqp", "pyamqp", "amqps"))
    result_url = _url(src, "MODELSERVE_RESULT_URL", ("redis", "rediss"))
    return Config(
        broker_url=broker_url,
        result_url=result_url,
        role=_choice(src, "MODELSERVE_ROLE", "front", ROLES),
        colour=_choice(src, "MODELSERVE_COLOUR", "none", COLOURS),
        release=release,
        deploy_id=src.get("MODELSERVE_DEPLOY_ID", ""),
        env=src.get("MODELSERVE_ENV", "dev"),
        host=src.get("MODELSERVE_HOST", "0.0.0.0"),
        port=_int(src, "MODELSERVE_PORT", 8080, 1, 65535),
        web_threads=_int(src, "MODELSERVE_WEB_THREADS", 32, 1, 512),
        # waitress processes sharing the listening socket (app.serve.serve_processes): one
        # process's GIL caps a front near 700 req/s on 2 cores; a deploy writes 2 for fronts
        web_processes=_int(src, "MODELSERVE_WEB_PROCESSES", 1, 1, 16),
        worker_concurrency=_int(src, "MODELSERVE_WORKER_CONCURRENCY", os.cpu_count() or 2, 1, 256),
        max_batch_rows=_int(src, "MODELSERVE_MAX_BATCH_ROWS", 10_000, 1, 1_000_000),
        max_body_bytes=_int(src, "MODELSERVE_MAX_BODY_BYTES", 1024 * 1024, 1024, 1 << 30),
        predict_timeout=_float(src, "MODELSERVE_PREDICT_TIMEOUT", 10.0, 0.1, 600.0),
        parse_bytes=_int(src, "MODELSERVE_PARSE_BYTES", 8 * 1024 * 1024, 1024, 1 << 32),
        connection_limit=_int(src, "MODELSERVE_CONNECTION_LIMIT", 256, 4, 10_000),
        client_timeout=_float(src, "MODELSERVE_CLIENT_TIMEOUT", 15.0, 1.0, 600.0),
        drain_seconds=_float(src, "MODELSERVE_DRAIN_SECONDS", 25.0, 0.0, 600.0),
        async_queue_max=_int(src, "MODELSERVE_ASYNC_QUEUE_MAX", 1000, 1, 10_000_000),
        async_expires=_float(src, "MODELSERVE_ASYNC_EXPIRES", 600.0, 1.0, 86_400.0),
        # async requests being accepted at once (a few web threads); beyond → 429 at once
        async_inflight=_int(src, "MODELSERVE_ASYNC_INFLIGHT", 2, 1, 256),
        # while synchronous requests are in progress, async ones get one thread and at most
        # this share of its time (app.serve.Lanes; 1: no pacing)
        async_busy_share=_float(src, "MODELSERVE_ASYNC_BUSY_SHARE", 0.1, 0.01, 1.0),
        # the async worker's niceness (app.worker.AsyncWorker; 0: as the sync worker)
        async_nice=_int(src, "MODELSERVE_ASYNC_NICE", 10, 0, 19),
        dispatch_threads=_int(src, "MODELSERVE_DISPATCH_THREADS", 2, 1, 64),
        batch_rows=_int(src, "MODELSERVE_BATCH_ROWS", 512, 1, 1_000_000),
        bundle_dir=src.get("MODELSERVE_BUNDLE_DIR", ""),
        release_file=src.get("MODELSERVE_RELEASE_FILE") or DEFAULT_RELEASE_FILE,
        instance_name=src.get("MODELSERVE_INSTANCE_NAME", ""),
        tls_ca=_tls_ca(src, (broker_url, result_url)),
        tls_check_hostname=_choice(src, "MODELSERVE_TLS_CHECK_HOSTNAME", "1", ("0", "1")) == "1",
        source=src,
    )
