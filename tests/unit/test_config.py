"""Config: env beats the instance file; a missing or malformed key is named in one line."""

import subprocess
import sys
from pathlib import Path

import pytest

from app.config import ConfigError, load_config, read_env_file

ROOT = Path(__file__).resolve().parents[2]
BASE = {"MODELSERVE_BROKER_URL": "amqp://u:p@127.0.0.1:5672/modelserve",
        "MODELSERVE_RESULT_URL": "redis://:pw@127.0.0.1:6379/0",
        "MODELSERVE_INSTANCE_ENV": "/nonexistent"}


def test_defaults_and_identity():
    cfg = load_config(BASE)
    assert (cfg.role, cfg.port, cfg.max_batch_rows, cfg.release) == ("front", 8080, 10_000, "dev")
    assert "p@" not in str(cfg.public())


def test_instance_file_is_read_and_env_wins(tmp_path):
    f = tmp_path / "instance.env"
    f.write_text("# written by the seed\nMODELSERVE_RELEASE='r1'\nMODELSERVE_COLOUR=green\n"
                 'export MODELSERVE_PORT="9000"\n\n')
    cfg = load_config({**BASE, "MODELSERVE_INSTANCE_ENV": str(f), "MODELSERVE_PORT": "9100"})
    assert (cfg.release, cfg.colour, cfg.port) == ("r1", "green", 9100)


@pytest.mark.parametrize("override, key", [
    ({"MODELSERVE_BROKER_URL": ""}, "MODELSERVE_BROKER_URL"),
    ({"MODELSERVE_BROKER_URL": "http://x"}, "MODELSERVE_BROKER_URL"),
    ({"MODELSERVE_RESULT_URL": "redis://"}, "MODELSERVE_RESULT_URL"),
    ({"MODELSERVE_BROKER_URL": "amqp://h:notaport/"}, "MODELSERVE_BROKER_URL"),
    ({"MODELSERVE_PORT": "eighty"}, "MODELSERVE_PORT"),
    ({"MODELSERVE_PORT": "70000"}, "MODELSERVE_PORT"),
    ({"MODELSERVE_ROLE": "boss"}, "MODELSERVE_ROLE"),
    ({"MODELSERVE_COLOUR": "red"}, "MODELSERVE_COLOUR"),
    ({"MODELSERVE_PREDICT_TIMEOUT": "0"}, "MODELSERVE_PREDICT_TIMEOUT"),
    ({"MODELSERVE_RELEASE": "a b"}, "MODELSERVE_RELEASE"),
    ({"MODELSERVE_WEB_PROCESSES": "0"}, "MODELSERVE_WEB_PROCESSES"),
    ({"MODELSERVE_WEB_PROCESSES": "17"}, "MODELSERVE_WEB_PROCESSES"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config({**BASE, **override})


def test_malformed_file_line_is_named(tmp_path):
    f = tmp_path / "instance.env"
    f.write_text("MODELSERVE_ROLE=front\nthis is not a pair\n")
    with pytest.raises(ConfigError, match=r"instance.env:2: malformed"):
        read_env_file(f)


@pytest.mark.parametrize("module", ["app.serve", "app.worker"])
def test_entry_points_exit_2_with_one_line(module):
    env = {"PATH": "/usr/bin:/bin", "MODELSERVE_INSTANCE_ENV": "/nonexistent",
           "MODELSERVE_RESULT_URL": "redis://:p@127.0.0.1:6379/0"}
    out = subprocess.run([sys.executable, "-m", module], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "MODELSERVE_BROKER_URL is required" in lines[0]


def test_tls_urls_need_a_readable_ca(tmp_path):
    tls = {**BASE, "MODELSERVE_BROKER_URL": "amqps://u:p@10.0.0.5:5671/modelserve",
           "MODELSERVE_RESULT_URL": "rediss://:pw@10.0.0.5:6380/0"}
    with pytest.raises(ConfigError, match="MODELSERVE_TLS_CA is required"):
        load_config(tls)
    with pytest.raises(ConfigError, match="MODELSERVE_TLS_CA="):
        load_config({**tls, "MODELSERVE_TLS_CA": str(tmp_path / "missing.pem")})
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = load_config({**tls, "MODELSERVE_TLS_CA": str(ca)})
    assert (cfg.tls_ca, cfg.tls_check_hostname) == (str(ca), True)
    assert not load_config({**tls, "MODELSERVE_TLS_CA": str(ca),
                            "MODELSERVE_TLS_CHECK_HOSTNAME": "0"}).tls_check_hostname


def test_celery_verifies_tls_peers_against_the_ca_only(tmp_path):
    import ssl

    from app.celery_app import make_celery, tls_settings

    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert tls_settings(load_config(BASE)) == {}  # plain URLs: no TLS settings
    cfg = load_config({**BASE, "MODELSERVE_BROKER_URL": "amqps://u:p@10.0.0.5:5671/modelserve",
                       "MODELSERVE_RESULT_URL": "rediss://:pw@10.0.0.5:6380/0",
                       "MODELSERVE_TLS_CA": str(ca)})
    conf = make_celery(cfg).conf
    assert conf.broker_use_ssl == {"ca_certs": str(ca), "cert_reqs": ssl.CERT_REQUIRED,
                                   "tls_minimum_version": ssl.TLSVersion.TLSv1_2,
                                   "server_hostname": None}  # None: kombu checks the URL's host
    assert conf.redis_backend_use_ssl == {"ssl_ca_certs": str(ca),
                                          "ssl_cert_reqs": ssl.CERT_REQUIRED,
                                          "ssl_check_hostname": True}


@pytest.mark.parametrize("processes, total, each", [(1, 2, 2), (2, 2, 1), (2, 5, 2), (3, 1, 1)])
def test_web_processes_share_the_dispatch_threads(processes, total, each):
    from app.serve import per_process

    cfg = load_config({**BASE, "MODELSERVE_WEB_PROCESSES": str(processes),
                       "MODELSERVE_DISPATCH_THREADS": str(total)})
    assert cfg.web_processes == processes and cfg.dispatch_threads == total
    assert per_process(cfg).dispatch_threads == each
    assert load_config(BASE).web_processes == 1  # `make run`; a deploy's seed writes 2
