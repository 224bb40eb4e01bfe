"""``BoundedCloud``: the only way the executor reaches a cloud (invariant I6).

Every ``Cloud`` protocol method runs under a named retry policy with a time bound
(``retry.CLOUD_CALL``: transient errors retried, anything else at once; giving up raises
``CloudUnavailable``, exit 6), and ``wait_for_instance`` polls under ``INSTANCE_BOOT`` with
the caller's timeout. The wrapped cloud is held in a name-mangled attribute and there is no
``__getattr__``: a method the protocol does not list cannot be called through it, so a bare
(unbounded) call from the executor is impossible. ``Context`` wraps whatever cloud it is given.
Per-attempt bounds (HTTP timeouts) are the implementations' job (lxd.py, openstack.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from rollout.clouds.base import (
    FipState,
    FloatingIP,
    HistoryEvent,
    Instance,
    InstanceSpec,
    Release,
    booted,
)
from rollout.retry import CLOUD_CALL, INSTANCE_BOOT, Policy

T = TypeVar("T")


class BoundedCloud:
    """A ``Cloud`` whose every call is bounded by a named retry policy."""

    def __init__(self, cloud, *, sleep: Callable[[float], None] = time.sleep,
                 policy: Policy = CLOUD_CALL):
        if isinstance(cloud, BoundedCloud):
            raise TypeError("already bounded")
        self.__cloud = cloud
        self.__sleep = sleep
        self.policy = policy
        self.name: str = getattr(cloud, "name", "?")

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return self.policy.run(fn, sleep=self.__sleep, what=what)

    @property
    def concurrent_reads(self) -> bool:
        """The implementation's word, now, that its reads may run side by side (views.observe)."""
        return bool(getattr(self.__cloud, "concurrent_reads", False))

    def unwraps(self, cloud) -> bool:
        """True if this wraps ``cloud`` (tests)."""
        return self.__cloud is cloud

    # -- releases -------------------------------------------------------------------------
    def list_releases(self) -> list[Release]:
        return self._call("listing releases", self.__cloud.list_releases)

    def find_release(self, release: str) -> Release | None:
        return self._call(f"finding release {release}", lambda: self.__cloud.find_release(release))

    def delete_release(self, release: Release, *, ignore_missing: bool = True) -> None:
        self._call(f"deleting image {release.name}", lambda: self.__cloud.delete_release(
            release, ignore_missing=ignore_missing))

    # -- instances ------------------------------------------------------------------------
    def list_instances(self, env: str | None) -> list[Instance]:
        return self._call("listing instances", lambda: self.__cloud.list_instances(env))

    def find_instance(self, instance_id: str) -> Instance | None:
        return self._call(f"reading {instance_id}",
                          lambda: self.__cloud.find_instance(instance_id))

    def get_instance(self, instance_id: str) -> Instance:
        return self._call(f"reading {instance_id}", lambda: self.__cloud.get_instance(instance_id))

    def pick_addresses(self, count: int) -> list[str] | None:
        pick = getattr(self.__cloud, "pick_addresses", None)
        if pick is None:  # a cloud without the method assigns addresses itself
            return None
        return self._call("picking fixed addresses", lambda: pick(count))

    def create_instance(self, spec: InstanceSpec) -> Instance:
        return self._call(f"creating {spec.name}", lambda: self.__cloud.create_instance(spec))

    def wait_for_instance(self, instance_id: str, *, timeout: float) -> Instance:
        """Poll ``get_instance`` (INSTANCE_BOOT, budget ``timeout``) until RUNNING with an
        address and a port; ``CloudError`` on ERROR; ``WaitTimeout`` (exit 7) when time is up."""
        return INSTANCE_BOOT.with_budget(timeout).run(
            lambda: booted(self.__cloud.get_instance(instance_id)), sleep=self.__sleep,
            what=f"waiting for instance {instance_id}")

    def delete_instance(self, instance_id: str, *, ignore_missing: bool = True) -> None:
        self._call(f"deleting {instance_id}", lambda: self.__cloud.delete_instance(
            instance_id, ignore_missing=ignore_missing))

    # -- floating IP ----------------------------------------------------------------------
    def find_floating_ip(self, env: str) -> FloatingIP | None:
        return self._call(f"reading the floating IP of env {env}",
                          lambda: self.__cloud.find_floating_ip(env))

    def create_floating_ip(self, env: str, address: str | None = None) -> FloatingIP:
        # a retry after a transient error that hid a success makes a second one: the caller
        # (lock.env_lock) re-reads and converges on the env's one floating IP
        return self._call(f"allocating the floating IP of env {env}",
                          lambda: self.__cloud.create_floating_ip(env, address))

    def update_floating_ip(self, fip: FloatingIP, *, target: str | None, state: FipState,
                           if_revision: str) -> FloatingIP:
        return self._call(f"updating the floating IP of env {fip.env}",
                          lambda: self.__cloud.update_floating_ip(
                              fip, target=target, state=state, if_revision=if_revision))

    def record_event(self, fip: FloatingIP, event: HistoryEvent) -> None:
        self._call(f"recording history of env {fip.env}",
                   lambda: self.__cloud.record_event(fip, event))

    def delete_floating_ip(self, fip: FloatingIP, *, ignore_missing: bool = True) -> None:
        self._call(f"releasing floating IP {fip.address}", lambda: self.__cloud.delete_floating_ip(
            fip, ignore_missing=ignore_missing))
