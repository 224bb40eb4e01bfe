"""Read-only views of an env (status, history) and ``destroy``, shaped for --json/the CLI.

Every cloud call goes through the context's ``BoundedCloud`` (invariant I6); ``destroy``
holds the env's lock (creating a floating IP just to hold it when the env has none).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from rollout import health
from rollout.clouds.base import Deployment, preview_env
from rollout.context import Context
from rollout.lock import env_lock


def observe(ctx: Context) -> Deployment:
    """Read the env's floating IP, all releases and the env's instances: side by side when
    the cloud allows it (OpenStack: three services, so the slowest read instead of the sum),
    else one after the other. A failed read fails the observation either way."""
    cloud = ctx.cloud
    if not cloud.concurrent_reads:
        fip = cloud.find_floating_ip(ctx.env)
        releases = cloud.list_releases()
        insts = cloud.list_instances(ctx.env)
        return Deployment(ctx.env, fip, tuple(releases), tuple(insts))
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="observe") as pool:
        releases_f = pool.submit(cloud.list_releases)
        insts_f = pool.submit(cloud.list_instances, ctx.env)
        fip = cloud.find_floating_ip(ctx.env)  # in this thread
        return Deployment(ctx.env, fip, tuple(releases_f.result()), tuple(insts_f.result()))


def lock_view(observed: Deployment) -> dict | None:
    """The lock on the env's floating IP, for status."""
    fip = observed.fip
    if not fip or not fip.state.lock:
        return None
    lk = fip.state.lock
    return {"holder": lk.holder, "since": lk.since, "deploy_id": lk.deploy_id,
            "expires": lk.expires or None}


def preview_view(ctx: Context, observed: Deployment) -> dict | None:
    """The pending preview and its address, for status."""
    pv = observed.preview
    if pv is None:
        return None
    pfip = ctx.cloud.find_floating_ip(preview_env(ctx.env))
    return {"release": pv.release, "deploy_id": pv.deploy_id,
            "address": pfip.address if pfip else None,
            "url": health.base_url(pfip.address, ctx.port) + "/" if pfip else None,
            "instances": [i.name for i in observed.preview_set()]}


def status(ctx: Context) -> dict:
    """Live release, rollback target, lock, pending preview, floating IP, instances and
    images of the env."""
    observed = observe(ctx)
    fip = observed.fip
    live = observed.live_instance
    return {
        "env": ctx.env,
        "cloud": ctx.cloud.name,
        "floating_ip": fip.address if fip else None,
        "url": health.base_url(fip.address, ctx.port) + "/" if fip else None,
        "target": fip.target if fip else None,
        "live": observed.live,
        "live_condition": observed.live_condition or None,
        "live_text": observed.describe_live(),
        "live_colour": live.colour if live else None,
        "previous": observed.previous,
        "lock": lock_view(observed),
        "preview": preview_view(ctx, observed),
        "instances": [
            {"name": i.name, "release": i.release, "colour": i.colour, "role": i.role,
             "status": i.status, "address": i.address, "deploy_id": i.deploy_id,
             "live": bool(live and i.deploy_id == live.deploy_id and i.release == live.release)}
            for i in observed.instances
        ],
        "releases": [
            {"release": r.release, "image": r.name, "built_at": r.built_at,
             "model_sha256": r.model_sha256, "model_accuracy": r.model_accuracy,
             "git_sha": r.git_sha, "provenance": r.provenance}
            for r in observed.releases
        ],
    }


def history(ctx: Context) -> list[dict]:
    """The env's switch history, oldest first."""
    fip = ctx.cloud.find_floating_ip(ctx.env)
    if fip is None:
        return []
    return [{"at": e.at, "action": e.action, "release": e.release,
             "from_release": e.from_release or None, "deploy_id": e.deploy_id,
             "detail": e.detail or None}
            for e in fip.history]


def destroy(ctx: Context, *, break_lock: bool = False) -> dict:
    """Delete every instance of the env and its floating IPs (its preview one too), holding
    the env's lock."""
    fip = ctx.cloud.find_floating_ip(ctx.env)
    if fip is None and not ctx.cloud.list_instances(ctx.env):
        return {"action": "destroy", "env": ctx.env, "deleted": [], "floating_ip": None}
    names: list[str] = []
    with env_lock(ctx, break_lock=break_lock, create=fip is None, temporary=True):
        for inst in ctx.cloud.list_instances(ctx.env):
            with ctx.reporter.step(f"delete {inst.name} ({inst.release}, {inst.role})"):
                ctx.cloud.delete_instance(inst.id)
            names.append(inst.name)
        pfip = ctx.cloud.find_floating_ip(preview_env(ctx.env))
        if pfip is not None:
            with ctx.reporter.step(f"release the preview address {pfip.address}"):
                ctx.cloud.delete_floating_ip(pfip)
        fip = ctx.cloud.find_floating_ip(ctx.env)
        if fip is not None:
            with ctx.reporter.step(f"release floating IP {fip.address}"):
                ctx.cloud.delete_floating_ip(fip)  # the lock goes with it
    return {"action": "destroy", "env": ctx.env, "deleted": names,
            "floating_ip": fip.address if fip else None}
