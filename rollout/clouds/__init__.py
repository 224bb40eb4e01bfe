"""Cloud implementations behind one protocol (see base.py); ``open_cloud`` picks one.

Configuration (environment): ``OS_CLOUD`` / ``OS_AUTH_URL`` select OpenStack, else LXD. On
LXD, ``MODELSERVE_LXD_PROJECT`` (default ``default``) is the LXD project of every image,
profile and instance (localcloud/lxd/project.py sets one up: ``python3 -m
localcloud.lxd.project ensure NAME``); ``MODELSERVE_LXD_BRIDGE`` (msbr0) the bridge of the
floating IPs; ``MODELSERVE_LXD_OP_TIMEOUT`` the bound of one LXD operation (600 s).
"""

from __future__ import annotations

import os

from rollout.clouds.base import Cloud


def default_cloud_name() -> str:
    """openstack when OS_CLOUD is set (or OS_AUTH_URL), else the local LXD cloud."""
    return "openstack" if os.environ.get("OS_CLOUD") or os.environ.get("OS_AUTH_URL") else "lxd"


def open_cloud(name: str | None = None, **options: object) -> Cloud:
    """Construct the named cloud; only here are the SDK modules imported (lazily)."""
    name = name or default_cloud_name()
    if name == "lxd":
        from rollout.clouds.lxd import LXDCloud

        return LXDCloud(**options)  # type: ignore[arg-type]
    if name == "openstack":
        try:
            from rollout.clouds.openstack import OpenStackCloud
        except ImportError as exc:
            from rollout.errors import CloudError

            raise CloudError(f"the openstack provider cannot be loaded: {exc}") from exc

        return OpenStackCloud(**options)  # type: ignore[arg-type]
    raise ValueError(f"unknown cloud {name!r} (choose lxd or openstack)")
