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
