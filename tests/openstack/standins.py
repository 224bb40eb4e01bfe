"""Stand-in release images for the OpenStack tier, booted as real servers on the LXD host.

The tier's rollout cases (e2e, safety, faults, progressive) need several releases and a few
that misbehave; baking each through Packer takes minutes (test_lxd_release.py does that for the
real image). A stand-in is the Glance base image that Packer's builds boot (Debian 12,
cloud-init taking its seed and network from Nova) plus the LXD tier's stdlib stand-in app
(tests/e2e/standin/): Nova boots it as a container, cloud-init runs rollout's NoCloud seed from
user_data, the app reads the instance.env the seed wrote and speaks the contract's routes.
A behaviour (``fail N``, ``slow N``, ``flip``) is a file baked into the image, as on LXD.

A tarball is built once per (base image, stand-in app, spec) into the harness's cache (about
90 MB; one per spec, an outdated one is replaced): a container is created from the base (never
started), the app's files are pushed into it, and it is published and exported as an LXD
unified tarball. Each test session uploads
them to Glance under fresh release names (``modelserve_provenance=standin``, so a plan never
picks one as a default release).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from app.bundle import sha256_file
from localcloud.openstack import config, lxdhost

APP = Path(__file__).resolve().parents[1] / "e2e" / "standin"
FILES = ("server.py", "modelserve-standin.service")
# the stand-in's unit, wanted by multi-user.target through a drop-in (a pushed file, where
# `systemctl enable` would need the container running to make its symlink)
WANTS = "[Unit]\nWants=modelserve-standin.service\n"


def spec_sha(spec: str) -> str:
    """The model sha256 a stand-in of ``spec`` serves (and its image claims)."""
    return hashlib.sha256(f"standin-model-os-{spec}".encode()).hexdigest()


def _files(spec: str) -> dict[str, bytes]:
    """Path in the image -> content, for ``spec`` (a label; ``fail N`` / ``slow N`` degrade,
    ``flip`` flips every label, ``broken`` fails /readyz)."""
    files = {"/opt/standin/server.py": (APP / "server.py").read_bytes(),
             "/etc/systemd/system/modelserve-standin.service":
                 (APP / "modelserve-standin.service").read_bytes(),
             "/etc/systemd/system/multi-user.target.d/modelserve-standin.conf": WANTS.encode(),
             "/opt/standin/model_sha256": f"{spec_sha(spec)}\n".encode()}
    words = spec.split()
    if words and words[0] in ("fail", "slow"):
        files["/opt/standin/degrade"] = f"{spec}\n".encode()
    elif spec == "flip":
        files["/opt/standin/flip"] = b""
    elif spec == "broken":
        files["/opt/standin/fail_readyz"] = b""
    return files


def tarball(spec: str) -> Path:
    """The stand-in of ``spec`` as an LXD unified tarball (built once, cached)."""
    base = lxdhost.base_tarball()
    files = _files(spec)
    key = hashlib.sha256(repr((base.name, sorted(files.items()))).encode()).hexdigest()[:16]
    label = "".join(c if c.isalnum() else "-" for c in spec)
    out = config.Layout().cache / f"os-standin-{label}-{key}.tar.zst"
    if out.exists():
        return out
    for old in out.parent.glob(f"os-standin-{label}-*.tar*"):
        if old.name.rsplit("-", 1)[0] == f"os-standin-{label}":
            old.unlink(missing_ok=True)  # built from an older base or app
    proj = ["--project", config.LXD_PROJECT]
    base_alias, name, alias = f"osstandin-base-{key}", f"osstandin-{key}", f"osstandin-{key}"
    for args in (("delete", "--force", name), ("image", "delete", alias),
                 ("image", "delete", base_alias)):
        lxdhost.lxc(*args, *proj, check=False)
    # the LXD host may hold the base already (Nova booted it: alias glance-<id>); LXD refuses
    # a second import of the same bytes, so use it by fingerprint (a tarball's sha256) then
    fingerprint = sha256_file(base)
    imported = lxdhost.query(lxdhost._p(f"/1.0/images/{fingerprint}"), check=False) is None
    try:
        if imported:
            lxdhost.lxc("image", "import", str(base), "--alias", base_alias, *proj, timeout=900)
        lxdhost.lxc("init", fingerprint, name, *proj)
        with tempfile.TemporaryDirectory() as tmp:
            for n, (path, content) in enumerate(files.items()):
                local = Path(tmp) / str(n)
                local.write_bytes(content)
                lxdhost.lxc("file", "push", "--create-dirs", str(local), f"{name}{path}", *proj)
        lxdhost.lxc("publish", name, "--alias", alias, "--compression", "zstd", *proj,
                    f"description=modelserve OpenStack stand-in ({spec})", timeout=900)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            lxdhost.lxc("image", "export", alias, f"{tmp}/image", *proj, timeout=900)
            made = list(Path(tmp).iterdir())
            assert len(made) == 1, f"lxc image export gave {[p.name for p in made]}"
            os.replace(made[0], out)
    finally:
        for args in (("delete", "--force", name), ("image", "delete", alias)) + (
                (("image", "delete", base_alias),) if imported else ()):
            lxdhost.lxc(*args, *proj, check=False)
    return out



def upload(conn, release: str, spec: str, properties: dict):
    """Upload the stand-in of ``spec`` to Glance as release ``release`` (private, disk_format
    lxd) with the release properties ``properties`` (+ its model sha256)."""
    props = {"modelserve_release": release, "modelserve_model_sha256": spec_sha(spec),
             "modelserve_provenance": "standin", "modelserve_standin_spec": spec,
             **properties}
    with open(tarball(spec), "rb") as fh:
        return conn.image.create_image(
            name=f"modelserve-{release}", data=fh, disk_format=config.LXD_DISK_FORMAT,
            container_format="bare", visibility="private", wait=True, **props)


def delete(conn, image_id: str) -> None:
    """A stand-in out of Glance, and the LXD host's import of it."""
    conn.image.delete_image(image_id, ignore_missing=True)
    lxdhost.lxc("image", "delete", f"glance-{image_id}", "--project", config.LXD_PROJECT,
                check=False)
