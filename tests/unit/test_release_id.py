"""One release-id grammar (app/release_id.py): the bake, the deploy CLI, the seed and the
app's config accept and refuse exactly the same ids."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from app.config import ConfigError, load_config
from app.release_id import check_release_id, is_release_id
from rollout import cli
from rollout.seed import Credentials, SeedParams

ROOT = Path(__file__).resolve().parents[2]
GOOD = ["r20261128-0630-7c1bfb0", "g7c1bfb0", "e2e-a", "a", "standin-worse", "9" * 30]
BAD = ["", "-a", "a-", "A1", "r1.2", "a_b", "a b", "x" * 31, "a/b", "ä"]


def _bake():
    spec = importlib.util.spec_from_file_location("bake", ROOT / "packer" / "bake.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _accepted_by_each(release: str) -> dict[str, bool]:
    out = {"grammar": is_release_id(release)}
    try:
        _bake().check_release(release)
        out["bake"] = True
    except Exception:  # noqa: BLE001 - BakeError
        out["bake"] = False
    try:
        cli.build_parser().parse_args(["plan", "--release", release])
        out["cli"] = True
    except SystemExit:
        out["cli"] = False
    try:
        SeedParams(role="front", colour="blue", release=release, deploy_id="d1", env="dev",
                   credentials=Credentials.generate()).values()
        out["seed"] = True
    except ValueError:
        out["seed"] = False
    try:
        load_config({"MODELSERVE_BROKER_URL": "amqp://u:p@127.0.0.1:1/ms",
                     "MODELSERVE_RESULT_URL": "redis://:p@127.0.0.1:1/0",
                     "MODELSERVE_INSTANCE_ENV": "/nonexistent", "MODELSERVE_RELEASE": release})
        out["config"] = True
    except ConfigError:
        out["config"] = False
    return out


@pytest.mark.parametrize("release", GOOD)
def test_every_part_accepts_a_valid_id(release):
    assert set(_accepted_by_each(release).values()) == {True}, _accepted_by_each(release)


@pytest.mark.parametrize("release", BAD)
def test_every_part_refuses_an_invalid_id(release, capsys):
    got = _accepted_by_each(release)
    if release == "":  # an empty release means "unset" to the config (its default: dev)
        got.pop("config")
    assert set(got.values()) == {False}, got
    with pytest.raises(ValueError, match="lowercase letters"):
        check_release_id(release)
