"""The env's deploy lock: a lease on its floating IP (invariants I3, I11).

``env_lock`` takes the lock with one compare-and-swap update of the floating IP, creating
the env's floating IP first if asked (race-free: after creating it re-reads, and a run whose
floating IP is not the one the cloud reports for the env deletes the one it created and
competes for the other). The lock names its holder (``user@host:pid``), its deploy id and a
lease end (``expires``) that ``renew`` pushes forward before every step. A lock is taken over
(with a warning line) when its lease has expired or its holder is on this host and provably
dead; a live holder on this host is never broken, not even by ``--break-lock``; elsewhere
``--break-lock`` is the operator's word that the run is dead. Every call is bounded (the
context's ``BoundedCloud``); taking and releasing run with signals deferred, and an error
met while releasing is reported beside the run's first error, with how to clear the lock.
"""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone

from rollout import cancel
from rollout.clouds.base import FloatingIP, Lock
from rollout.context import Context, parse_utc, pause_hook, utcnow
from rollout.errors import CloudError, Conflict, DeployLocked, PlanError, RolloutError, add_also

ATTEMPTS = 10


def pid_alive(pid: int) -> bool:
    """False only when ``pid`` provably does not exist on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def takeover_reason(held: Lock, *, break_lock: bool, env: str, now: datetime | None = None
                    ) -> str:
    """Why ``held`` (another run's lock) may be taken over, or ``DeployLocked``."""
    now = now or datetime.now(timezone.utc)
    same_host = held.host == socket.gethostname()
    if same_host and held.pid is not None and pid_alive(held.pid):
        raise DeployLocked(env, held.holder, held.since, held.deploy_id)  # never broken
    expires = parse_utc(held.expires)
    if same_host and held.pid is not None:
        return f"its process {held.pid} on this host is gone"
    if expires is not None and expires < now:
        return f"its lease expired at {held.expires}"
    if break_lock:
        return "--break-lock"
    raise DeployLocked(env, held.holder, held.since, held.deploy_id)


def _mine(ctx: Context) -> Lock:
    return Lock(ctx.holder, utcnow(), ctx.deploy_id, utcnow(ctx.lease_s))


def _ours(ctx: Context, fip: FloatingIP | None) -> bool:
    return bool(fip and fip.state.lock and fip.state.lock.deploy_id == ctx.deploy_id)


def _acquire(ctx: Context, *, break_lock: bool, create: bool) -> tuple[Lock, FloatingIP | None]:
    """Take the lock; returns it and the floating IP this run created (if any). A run that
    loses (DeployLocked) after allocating a floating IP that is not the env's one releases
    it: a race into a new env leaves one floating IP (I11)."""
    created: list[FloatingIP] = []
    try:
        return _acquire_once(ctx, break_lock=break_lock, create=create, created=created)
    except DeployLocked:
        if created:
            cur = ctx.cloud.find_floating_ip(ctx.env)
            if cur is None or cur.id != created[0].id:
                _discard(ctx, created[0])
        raise


def _acquire_once(ctx: Context, *, break_lock: bool, create: bool,
                  created: list[FloatingIP]) -> tuple[Lock, FloatingIP | None]:
    cloud, env = ctx.cloud, ctx.env
    made: FloatingIP | None = None
    for _attempt in range(ATTEMPTS):
        fip = cloud.find_floating_ip(env)
        if fip is None:
            if not create:
                raise PlanError(f"env {env} has no floating IP: nothing was ever deployed")
            if made is not None:
                raise CloudError(f"the floating IP {made.address} of env {env} vanished")
            pause_hook("create_floating_ip")
            with ctx.reporter.step(f"allocate the floating IP of env {env}"):
                try:
                    made = cloud.create_floating_ip(env)
                    created[:] = [made]
                except Conflict:  # another run made it: use theirs
                    pass
            continue  # re-read: the cloud's answer is the env's one floating IP
        held = fip.state.lock
        if held and held.deploy_id != ctx.deploy_id:
            why = takeover_reason(held, break_lock=break_lock, env=env)
            ctx.reporter.warn(f"taking over the lock of env {env} from {held.holder} (deploy "
                              f"{held.deploy_id}, since {held.since}, lease until "
                              f"{held.expires or '-'}): {why}")
            ctx.took_over = held
        pause_hook("lock")
        mine = _mine(ctx)
        try:
            locked = cloud.update_floating_ip(fip, target=fip.target,
                                              state=replace(fip.state, lock=mine),
                                              if_revision=fip.revision)
        except Conflict:
            ctx.sleep(random.uniform(0.05, 0.2))
            continue
        cur = cloud.find_floating_ip(env)
        if cur is not None and cur.id == locked.id and _ours(ctx, cur):
            if made is not None and made.id != cur.id:
                _discard(ctx, made)
                created.clear()
            ctx.held = mine
            return mine, (made if made is not None and made.id == cur.id else None)
        # our lock sits on a floating IP that is not (or no longer) the env's one
        if made is not None and made.id == locked.id:
            _discard(ctx, locked)
            made = None
            created.clear()
    raise RolloutError(f"could not take the lock of env {env}: it keeps changing; retry")


def _discard(ctx: Context, fip: FloatingIP) -> None:
    """Delete a floating IP this run created and lost a race with (never another's)."""
    ctx.reporter.warn(f"another run allocated env {ctx.env}'s floating IP at the same time; "
                      f"releasing ours ({fip.address})")
    ctx.cloud.delete_floating_ip(fip)


def renew(ctx: Context) -> None:
    """Push the lease forward; ``DeployLocked`` if our lock is gone (taken over)."""
    if ctx.held is None:
        return
    for _attempt in range(ATTEMPTS):
        fip = ctx.cloud.find_floating_ip(ctx.env)
        if not _ours(ctx, fip):
            lk = fip.state.lock if fip else None
            raise DeployLocked(ctx.env, *((lk.holder, lk.since, lk.deploy_id) if lk else
                                          ("nobody (our lock was broken)", "-", "-")))
        assert fip is not None and fip.state.lock is not None
        new = replace(fip.state.lock, expires=utcnow(ctx.lease_s))
        try:
            ctx.cloud.update_floating_ip(fip, target=fip.target,
                                         state=replace(fip.state, lock=new),
                                         if_revision=fip.revision)
        except Conflict:
            ctx.sleep(random.uniform(0.05, 0.2))
            continue
        ctx.held = new
        return
    raise RolloutError(f"could not renew the lock of env {ctx.env}: it keeps changing")


def release(ctx: Context, *, delete_created: FloatingIP | None = None) -> None:
    """Clear our lock (or delete the floating IP this run created only to hold the lock, if
    it still has no target). Raises on failure; a lock that is no longer ours is left."""
    for _attempt in range(ATTEMPTS):
        fip = ctx.cloud.find_floating_ip(ctx.env)
        if not _ours(ctx, fip):
            return
        assert fip is not None
        if delete_created is not None and fip.id == delete_created.id and fip.target is None:
            ctx.cloud.delete_floating_ip(fip)
            return
        try:
            ctx.cloud.update_floating_ip(fip, target=fip.target,
                                         state=replace(fip.state, lock=None),
                                         if_revision=fip.revision)
            return
        except Conflict:
            ctx.sleep(random.uniform(0.05, 0.2))
    raise RolloutError("the floating IP keeps changing")


def _clear_hint(ctx: Context) -> str:
    return (f"the lock of env {ctx.env} (deploy {ctx.deploy_id}) may remain; clear it with: "
            f"python -m rollout cleanup --env {ctx.env} --break-lock")


@contextmanager
def env_lock(ctx: Context, *, break_lock: bool = False, create: bool = True,
             temporary: bool = False) -> Iterator[Lock]:
    """Hold the env's deploy lock for the block.

    ``create``: allocate the env's floating IP if it has none (race-free, see module doc).
    ``temporary``: a floating IP created here only to hold the lock is deleted at the end
    (cleanup/destroy of an env without one), if it still has no target."""
    held: Lock | None = None
    created: FloatingIP | None = None
    try:
        with cancel.deferred():  # a signal while taking: raised once the lock is ours
            held, created = _acquire(ctx, break_lock=break_lock, create=create)
        yield held
    except BaseException as exc:
        if held is not None:
            with cancel.deferred(raise_pending=False):
                try:
                    release(ctx, delete_created=created if temporary else None)
                except BaseException as err:  # noqa: BLE001 - beside the first error
                    add_also(exc, f"releasing the lock failed ({err}); {_clear_hint(ctx)}")
        ctx.held = None
        raise
    else:
        with cancel.deferred(raise_pending=False):
            try:
                release(ctx, delete_created=created if temporary else None)
            except Exception as err:
                raise CloudError(f"the run finished, but releasing the lock failed ({err}); "
                                 f"{_clear_hint(ctx)}") from err
            finally:
                ctx.held = None
