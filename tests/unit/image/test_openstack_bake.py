"""packer/bake.py --cloud openstack, its logic against an in-memory Glance (the real bake
through Nova is tests/openstack/test_lxd_release.py): the deps layer is a Glance image reused
while its key is unchanged, else baked by Packer from the base first; the release layer is
baked by Packer from the deps image; the key follows the base image."""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path

import pytest

from tests.unit.image.test_static import ROOT, load_bake

PROV = {"git_sha": "a" * 40, "dirty": "false", "security_week": "2026-W48",
        "app_version": "1.0", "model_sha256": "b" * 64, "model_accuracy": "0.8",
        "accuracy_floor": "0.6", "provenance": "release", "built_at": "2026-11-28T00:00:00Z"}


class FakeImageApi:
    """conn.image: images(name=, status=, visibility=) and get_image, over a list."""

    def __init__(self, images):
        self.list = images

    def images(self, **query):
        return [i for i in self.list if all(getattr(i, k) == v for k, v in query.items())]

    def get_image(self, image_id):
        return next(i for i in self.list if i.id == image_id)


def image(name, id, visibility="public", created="2026-11-28T00:00:00Z", **props):
    return types.SimpleNamespace(name=name, id=id, status="active", visibility=visibility,
                                 checksum=f"sum-{id}", created_at=created, properties=props,
                                 size=123)


@pytest.fixture
def bake(monkeypatch, tmp_path):
    """(bake module, Glance list, recorded packer builds); Packer's build "publishes" into
    the fake Glance what a real one would."""
    mod = load_bake()
    monkeypatch.setenv("MODELSERVE_SECURITY_WEEK", "2026-W48")
    glance = [image("debian-12-modelserve-base", "base-1")]
    builds = []
    conn = types.SimpleNamespace(image=FakeImageApi(glance))
    monkeypatch.setattr(mod, "openstack_connect", lambda: conn)
    monkeypatch.setattr(mod, "extra_ca_pem", lambda spec: "")

    def packer_build(only, variables, var_file, manifest):
        builds.append((only, dict(variables)))
        run = f"run-{len(builds)}"  # what Packer's manifest post-processor writes
        manifest.write_text(json.dumps({"builds": [{"artifact_id": f"x-{len(builds)}",
                                                    "packer_run_uuid": run}],
                                        "last_run_uuid": run}))
        if variables["layer"] == "deps":
            glance.append(image(variables["lxd_output_image"], f"deps-{len(builds)}",
                                "private", modelserve_deps_key=variables["deps_key"]))
            return f"deps-{len(builds)}"
        glance.append(image(f"modelserve-{variables['release']}", f"rel-{len(builds)}",
                            "private", modelserve_release=variables["release"]))
        return f"rel-{len(builds)}"

    monkeypatch.setattr(mod, "packer_build", packer_build)
    monkeypatch.setattr(mod, "MANIFEST", tmp_path / "manifest.json")
    return mod, glance, builds


def args(tmp_path, **kw):
    ns = dict(env="ci", scripts_dir=ROOT / "image-scripts", deps_salt="", rebuild_deps=False,
              deps_only=False, extra_ca_certs="none", src=ROOT, cloud="openstack")
    ns.update(kw)
    return argparse.Namespace(**ns)


def test_no_deps_image_bakes_the_deps_layer_from_the_base_then_the_release(bake, tmp_path):
    mod, glance, builds = bake
    res = mod.bake_openstack(args(tmp_path), "r1", PROV, tmp_path / "w1")
    (only1, deps), (only2, rel) = builds
    assert only1 == only2 == "openstack.modelserve"
    assert deps["layer"] == "deps" and "os_source_image_name" not in deps  # the env's base
    assert deps["lxd_output_image"] == res["deps_image"] == f"modelserve-deps-{deps['deps_key']}"
    assert rel["layer"] == "release" and rel["release"] == "r1"
    assert rel["os_source_image_name"] == res["deps_image"]
    assert rel["os_source_image_visibility"] == "private"
    assert res["deps_reused"] is False and res["image_id"] == "rel-2"
    assert res["base_image"] == "debian-12-modelserve-base"


def test_a_present_deps_image_is_reused_and_only_the_release_is_baked(bake, tmp_path):
    mod, glance, builds = bake
    mod.bake_openstack(args(tmp_path), "r1", PROV, tmp_path / "w2")
    builds.clear()
    res = mod.bake_openstack(args(tmp_path), "r2", PROV, tmp_path / "w3")
    assert [b[1]["layer"] for b in builds] == ["release"] and res["deps_reused"] is True
    # --rebuild-deps bakes it again
    builds.clear()
    mod.bake_openstack(args(tmp_path, rebuild_deps=True), "r3", PROV, tmp_path / "w4")
    assert [b[1]["layer"] for b in builds] == ["deps", "release"]


def test_a_deps_image_of_another_key_or_base_is_not_reused(bake, tmp_path):
    mod, glance, builds = bake
    key = mod.bake_openstack(args(tmp_path, deps_only=True), "r1", PROV, tmp_path / "w5")["deps_image"]
    assert [b[1]["layer"] for b in builds] == ["deps"]  # --deps-only: no release layer
    # same name, wrong key property: not the layer
    for img in glance:
        if img.name == key:
            img.properties["modelserve_deps_key"] = "something-else"
    builds.clear()
    mod.bake_openstack(args(tmp_path), "r2", PROV, tmp_path / "w6")
    assert [b[1]["layer"] for b in builds] == ["deps", "release"]
    # a newer base image: a new key, a new deps layer
    glance.append(image("debian-12-modelserve-base", "base-2", created="2026-11-29T00:00:00Z"))
    builds.clear()
    res = mod.bake_openstack(args(tmp_path), "r3", PROV, tmp_path / "w7")
    assert [b[1]["layer"] for b in builds] == ["deps", "release"]
    assert res["deps_image"] != key


def test_missing_base_or_existing_release_fail_before_any_build(bake, tmp_path):
    mod, glance, builds = bake
    glance.append(image("modelserve-r1", "old", "private"))
    with pytest.raises(mod.BakeError, match="immutable"):
        mod.bake_openstack(args(tmp_path), "r1", PROV, tmp_path / "w8")
    glance[:] = []
    with pytest.raises(mod.BakeError, match="debian-12-modelserve-base.*os_source_image_name"):
        mod.bake_openstack(args(tmp_path), "r2", PROV, tmp_path / "w9")
    assert builds == []


def test_openstack_bakes_debian_with_its_login_user_in_every_env():
    mod = load_bake()
    for var_file in sorted((ROOT / "packer" / "env").glob("*.pkrvars.hcl")):
        name = mod.pkrvar(var_file, "os_source_image_name", "debian-12")
        assert name.startswith("debian-12"), var_file.name
        assert mod.pkrvar(var_file, "os_ssh_username", "debian") == "debian", var_file.name
    hcl = (ROOT / "packer" / "variables.pkr.hcl").read_text() + \
        (ROOT / "packer" / "sources.pkr.hcl").read_text()
    assert "ubuntu" not in hcl.replace("Ubuntu: ubuntu", "")
    assert mod.pkrvar(Path(ROOT / "packer/env/ci.pkrvars.hcl"), "os_flavor", "") == "ms.lxd"


def test_each_bake_reads_its_own_manifest_and_all_are_recorded(bake, tmp_path):
    """Bakes side by side (the OpenStack tier beside the LXD tiers) each get Packer's manifest
    in a file of their own (their work dir), and packer/manifest.json records every one."""
    mod, glance, builds = bake
    for release in ("r1", "r2"):
        work = tmp_path / release
        work.mkdir()
        mod.bake_openstack(args(tmp_path), release, PROV, work)
        assert json.loads((work / "manifest-release.json").read_text())["builds"]
    recorded = json.loads((tmp_path / "manifest.json").read_text())
    assert [b["artifact_id"] for b in recorded["builds"]] == ["x-2", "x-3"]  # both releases
    assert recorded["last_run_uuid"] == "run-3"
