"""``python -m rollout``: the only error boundary of the deploy tool.

Installs its own SIGINT/SIGTERM/SIGHUP handlers first (``cancel.py``: whatever disposition
was inherited, a signal cancels the run), validates every argument before any cloud call
(bad input: one ``error:`` line, exit 2, nothing touched: invariant I9), builds the cloud and
the context, runs one command, prints progress on stderr (rich) and results on stdout
(``--json``), and turns exceptions into one line and an exit status (``ExitCode``). A
signal: the executor has already undone this run's changes when ``Cancelled`` gets here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from enum import IntEnum

from rich.console import Console

from app.release_id import RULE as RELEASE_RULE
from app.release_id import is_release_id
from rollout import analysis, cancel, diff, executor, notify, redact
from rollout.clouds import default_cloud_name, open_cloud
from rollout.errors import (
    AnalysisFailed,
    Cancelled,
    CloudError,
    DeployLocked,
    DiffRefused,
    HealthCheckFailed,
    PlanError,
    RolloutError,
    WaitTimeout,
    also_text,
)
from rollout.planner import AbortRequest, DeployRequest, PromoteRequest, RollbackRequest

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,19}$")


class ExitCode(IntEnum):
    """Exit statuses (httpie-style): scripts can tell what went wrong."""

    OK = 0
    ERROR = 1  # any other RolloutError
    USAGE = 2  # argparse
    PLAN = 3  # refused by the planner (unknown release, accuracy gate, nothing to roll back)
    LOCKED = 4  # another deploy holds the env lock
    UNHEALTHY = 5  # the green instance failed its health gate / post-switch check
    CLOUD = 6  # the cloud failed (permanent error, or transient errors beyond the budget)
    TIMEOUT = 7  # a wait ran out of time
    ANALYSIS_FAILED = 8  # the post-switch analysis failed: switched back (or, first deploy, left)
    SIGHUP = 129  # hang-up (after undo)
    INTERRUPTED = 130  # SIGINT / Ctrl-C (after undo)
    SIGTERM = 143  # terminated (after undo)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is ONE line ``error: ...`` and exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(ExitCode.USAGE, f"error: {self.prog.split()[-1]}: {message}\n")


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{what} must be >= {low}, got {n}")
        return n
    return parse


def _float_in(low: float, high: float | None, what: str, *, open_low: bool = False):
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if x != x or (x <= low if open_low else x < low) or (high is not None and x > high):
            bound = (f"> {low:g}" if open_low else f">= {low:g}") + (
                f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"{what} must be {bound}, got {text}")
        return x
    return parse


def _env_name(text: str) -> str:
    if not _NAME.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: lowercase letters, digits and '-', starting with a letter, max 20")
    return text


def _url(text: str) -> str:
    if not notify.valid_url(text):
        raise argparse.ArgumentTypeError(f"{notify.redact_url(text)!r}: not an http(s) URL")
    return text


def _diff_sample(path: str) -> list[dict]:
    """--diff-sample FILE: its rows, read and validated now (before any cloud call)."""
    try:
        return diff.load_sample(path)
    except diff.SampleError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _release_name(text: str) -> str:
    if not is_release_id(text):
        raise argparse.ArgumentTypeError(f"{text!r}: {RELEASE_RULE}")
    return text


def version() -> str:
    """The project version: the installed distribution's metadata when this code is that
    distribution's, else the source tree's (``app.__version__``, which the build reads)."""
    from importlib import metadata
    from pathlib import Path

    from app import __version__
    try:
        dist = metadata.distribution("modelserve")
        if Path(str(dist.locate_file("rollout/cli.py"))).resolve() == Path(__file__).resolve():
            return dist.version
    except metadata.PackageNotFoundError:
        pass
    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands deploy, rollback, status, history, plan, cleanup)."""
    common = _Parser(add_help=False)
    common.add_argument("--cloud", choices=("lxd", "openstack"), default=None,
                        help="default: openstack when OS_CLOUD is set, else lxd")
    common.add_argument("--env", type=_env_name, default="dev",
                        help="environment: its own floating IP and instances (default dev)")
    common.add_argument("--json", action="store_true", help="machine output on stdout")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")

    p = _Parser(prog="python -m rollout",
                                description="Blue-green releases of modelserve images.",
                                epilog="exit status: 0 ok, 1 error, 2 usage, 3 refused, 4 "
                                       "locked, 5 unhealthy, 6 cloud error, 7 timeout, 8 "
                                       "post-switch analysis failed (switched back), 130/143/"
                                       "129 signal (after undo)")
    p.add_argument("--version", action="version", version=f"modelserve-rollout {version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def deploy_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--release", type=_release_name, default=None,
                        help="release id (default: the newest image)")
        sp.add_argument("--workers", type=_int_at_least(0, "--workers"), default=0,
                        help="extra worker-only instances for this release (>= 0)")
        sp.add_argument("--keep", type=_int_at_least(2, "--keep"), default=2,
                        help="releases kept warm in the env, live included (>= 2)")
        sp.add_argument("--force", action="store_true",
                        help="override the quality floor and the accuracy gate (recorded)")
        sp.add_argument("--tolerance", type=_float_in(0.0, 1.0, "--tolerance"), default=0.01,
                        help="allowed held-out accuracy drop vs live (default 0.01)")
        sp.add_argument("--min-accuracy", type=_float_in(0.0, 1.0, "--min-accuracy"),
                        default=None, help="quality floor (default: the image's)")
        sp.add_argument("--max-disagreement", type=_float_in(0.0, 1.0, "--max-disagreement"),
                        default=diff.DEFAULT_MAX_DISAGREEMENT,
                        help="model-diff gate: refuse when more than this share of the rows "
                             "flip label between live and new (default "
                             f"{diff.DEFAULT_MAX_DISAGREEMENT:g}; --force overrides)")
        sp.add_argument("--diff-sample", type=_diff_sample, default=None, metavar="FILE",
                        help="model-diff gate: also compare these recorded requests (JSONL: a "
                             "request body or one instance per line, at most "
                             f"{diff.MAX_SAMPLE_ROWS} rows)")

    def analysis_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--analysis-window", type=_float_in(0.0, 86400.0, "--analysis-window"),
                        default=None, metavar="SECONDS",
                        help="after the switch, probe the new release this long and switch "
                             f"back on a breach (exit {int(ExitCode.ANALYSIS_FAILED)}); 0: off "
                             f"(default {analysis.DEFAULT_WINDOW_S:g}, or ${analysis.WINDOW_ENV})")
        sp.add_argument("--max-error-rate", type=_float_in(0.0, 1.0, "--max-error-rate"),
                        default=analysis.Thresholds.max_error_rate,
                        help="analysis: highest error rate (5xx, timeouts, connection "
                             "failures) allowed (default 0.01)")
        sp.add_argument("--max-p99-ratio",
                        type=_float_in(0.0, None, "--max-p99-ratio", open_low=True),
                        default=analysis.Thresholds.max_p99_ratio,
                        help="analysis: p99 may reach this x the baseline's p99 ... (default 3)")
        sp.add_argument("--p99-slack-ms", type=_float_in(0.0, None, "--p99-slack-ms"),
                        default=analysis.Thresholds.p99_slack_ms,
                        help="... plus this many ms (default 50)")

    def notify_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--notify", type=_url, action="append", default=[], metavar="URL",
                        help="POST a CloudEvent at each step of the run (repeatable; also "
                             f"${notify.NOTIFY_ENV}, comma or space separated)")

    def health_timeout_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--health-timeout",
                        type=_float_in(0.0, None, "--health-timeout", open_low=True),
                        default=240.0, help="seconds the health gate may take (> 0)")

    sp = sub.add_parser("deploy", parents=[common], help="deploy a release (blue-green)")
    deploy_args(sp)
    sp.add_argument("--preview", action="store_true",
                    help="launch and gate the release, serve it on the env's preview address "
                         "and stop there: no switch (then promote or abort)")
    sp.add_argument("--no-probe", action="store_true", help="no load probe during the switch")
    analysis_args(sp)
    notify_arg(sp)
    sp.add_argument("--boot-timeout", type=_float_in(0.0, None, "--boot-timeout", open_low=True),
                    default=180.0, help="seconds an instance may take to boot (> 0)")
    health_timeout_arg(sp)
    sp = sub.add_parser("promote", parents=[common],
                        help="switch to the pending preview (gate, probe, analysis)")
    sp.add_argument("--keep", type=_int_at_least(2, "--keep"), default=2,
                    help="releases kept warm in the env, live included (>= 2)")
    sp.add_argument("--force", action="store_true",
                    help="override the quality floor and the accuracy gate (recorded)")
    sp.add_argument("--no-probe", action="store_true", help="no load probe during the switch")
    analysis_args(sp)
    notify_arg(sp)
    health_timeout_arg(sp)
    sp = sub.add_parser("abort", parents=[common],
                        help="end the pending preview and delete its instances")
    notify_arg(sp)
    sp = sub.add_parser("plan", parents=[common], help="print the steps a deploy would take")
    deploy_args(sp)
    sp = sub.add_parser("rollback", parents=[common], help="switch back to the previous release")
    sp.add_argument("--to", type=_release_name, default=None,
                    help="a warm release to switch to (default: the previous one)")
    sp.add_argument("--no-probe", action="store_true")
    notify_arg(sp)
    sub.add_parser("status", parents=[common], help="live/previous release, instances, images")
    sub.add_parser("history", parents=[common], help="the env's switches, oldest first")
    sp = sub.add_parser("cleanup", parents=[common],
                        help="delete leftovers of failed runs and releases beyond --keep")
    sp.add_argument("--keep", type=_int_at_least(2, "--keep"), default=2)
    sp.add_argument("--images", action="store_true",
                    help="also delete images beyond --keep (never one in use)")
    sp.add_argument("--break-lock", action="store_true",
                    help="take the env lock even if a (dead) run holds it, and delete that "
                         "run's instances (never a live holder's; printed first)")
    sp = sub.add_parser("destroy", parents=[common],
                        help="delete every instance of the env and its floating IP")
    sp.add_argument("--yes", action="store_true", help="required: this stops the live release")
    sp.add_argument("--break-lock", action="store_true")
    return p


def _print_status(con: Console, st: dict) -> None:
    from rich.table import Table  # status only: not imported by deploy/rollback

    con.print(f"env [bold]{st['env']}[/] on {st['cloud']}: floating IP "
              f"{st['floating_ip'] or '-'} → [bold green]{st['live_text']}[/] "
              f"({st['live_colour'] or '-'}), previous {st['previous'] or '-'}")
    if st["lock"]:
        lk = st["lock"]
        con.print(f"[yellow]locked[/] by {lk['holder']} since {lk['since']} "
                  f"(deploy {lk['deploy_id']}, lease until {lk['expires'] or '-'})")
    if st.get("preview"):
        pv = st["preview"]
        con.print(f"[cyan]preview[/] {pv['release']} at {pv['url'] or '-'} (deploy "
                  f"{pv['deploy_id']}): python -m rollout promote --env {st['env']} | abort "
                  f"--env {st['env']}")
    t = Table("instance", "release", "colour", "role", "status", "address", "live")
    for i in st["instances"]:
        t.add_row(i["name"], i["release"], i["colour"], i["role"], i["status"],
                  i["address"] or "-", "●" if i["live"] else "")
    con.print(t)
    t = Table("release", "image", "built", "accuracy", "model sha256")
    for r in st["releases"]:
        acc = "-" if r["model_accuracy"] is None else f"{r['model_accuracy']:.4f}"
        t.add_row(r["release"], r["image"], r["built_at"], acc, r["model_sha256"][:12])
    con.print(t)


DESTRUCTIVE = ("destroy", "cleanup", "abort")


def _cloud_from_environment() -> str | None:
    """``OS_CLOUD=name`` or ``OS_AUTH_URL=url`` when the shell's environment (not --cloud)
    would choose OpenStack, else None."""
    for key in ("OS_CLOUD", "OS_AUTH_URL"):
        if os.environ.get(key):
            return f"{key}={os.environ[key]}"
    return None


def _confirm_cloud_from_environment(args, err: Console) -> int | None:
    """A destructive command never takes its cloud from the environment alone: an openrc
    sourced for other work must not turn `make demo-down` into a destroy on a real cloud.
    Without --cloud, when OS_CLOUD/OS_AUTH_URL chose OpenStack, say which cloud and env,
    then ask for the env's name typed back (`--yes` is not enough: it needs --cloud as
    well). Returns the exit status of a refusal, or None to go on."""
    if args.command not in DESTRUCTIVE or args.cloud is not None:
        return None
    source = _cloud_from_environment()
    if source is None:
        return None
    err.print(f"{args.command} would act on env {args.env} of the OpenStack cloud chosen by "
              f"{source} in your environment (no --cloud given; the local demo is "
              "--cloud lxd).", markup=False, highlight=False)
    if getattr(args, "yes", False):
        err.print(f"error: {args.command} --yes takes its cloud from --cloud only: add "
                  "--cloud openstack to act on that cloud, or --cloud lxd for the local one",
                  markup=False, highlight=False)
        return ExitCode.USAGE
    err.print(f"Type the env's name ({args.env}) to go on: ", end="", markup=False,
              highlight=False)
    answer = sys.stdin.readline() if sys.stdin is not None else ""
    if answer.strip() != args.env:
        err.print(f"\nerror: {args.command} not confirmed (got {answer.strip()!r}): nothing "
                  "was touched", markup=False, highlight=False)
        return ExitCode.USAGE
    return None


def run(argv: list[str] | None = None, *, stdout=None, stderr=None, cloud=None,
        configure=None) -> int:
    """Parse, run, report; returns the exit status. ``cloud`` replaces ``--cloud`` and
    ``configure(ctx)`` adjusts the context (tests inject faults at the Cloud boundary)."""
    previous = cancel.install()  # first: a signal from now on cancels (and undoes)
    try:
        return _run(argv, stdout=stdout, stderr=stderr, cloud=cloud, configure=configure)
    except Cancelled as exc:  # before or after the command's own error boundary
        return exc.exit_code
    finally:
        cancel.restore(previous)


def _run(argv, *, stdout, stderr, cloud, configure) -> int:
    stdout = stdout or sys.stdout
    err = Console(file=stderr or sys.stderr, highlight=False)
    try:
        with contextlib.redirect_stderr(err.file), contextlib.redirect_stdout(stdout):
            args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage: nothing was touched
        return int(exc.code or 0) if isinstance(exc.code, int) else ExitCode.USAGE
    except Cancelled as exc:
        return exc.exit_code
    try:
        _resolve_env_args(args)
    except ValueError as exc:  # a bad environment variable: usage, nothing touched
        err.print(f"error: {args.command}: {exc}", markup=False, highlight=False)
        return ExitCode.USAGE
    if args.command == "destroy" and not args.yes:
        err.print(f"[red]error:[/] destroy stops env {args.env}'s live release: add --yes")
        return ExitCode.USAGE
    refused = _confirm_cloud_from_environment(args, err)
    if refused is not None:
        return refused
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        stream=err.file, format="%(name)s: %(message)s")
    redact.install()  # -v logs SDK request/response bodies: seeds and passwords stay out
    cloud_name = args.cloud or default_cloud_name()

    def emit(obj: object) -> None:
        stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        stdout.flush()

    stack = contextlib.ExitStack()
    try:
        cloud = cloud or open_cloud(cloud_name)
        ctx = executor.Context(cloud=cloud, env=args.env, reporter=executor.Reporter(err))
        if getattr(args, "notify", None):
            ctx.notifier = notify.Notifier(args.notify, args.env, warn=ctx.reporter.warn)
            stack.callback(ctx.notifier.close)  # bounded: at most 1 s
        if args.command in ("deploy", "promote"):
            ctx.probe = not args.no_probe
            ctx.boot_timeout = getattr(args, "boot_timeout", ctx.boot_timeout)
            ctx.health_timeout = args.health_timeout
            ctx.analysis_window = args.analysis_window
            ctx.thresholds = analysis.Thresholds(args.max_error_rate, args.max_p99_ratio,
                                                 args.p99_slack_ms)
            if configure:
                configure(ctx)
            res = (executor.deploy(ctx, _deploy_request(args, ctx.deploy_id))
                   if args.command == "deploy" else
                   executor.promote(ctx, PromoteRequest(args.env, ctx.deploy_id, args.keep,
                                                        args.force)))
            _closing(err, res)
        elif args.command == "abort":
            if configure:
                configure(ctx)
            res = executor.abort(ctx, AbortRequest(args.env, ctx.deploy_id))
            _closing(err, res)
        elif args.command == "rollback":
            ctx.probe = not args.no_probe
            if configure:
                configure(ctx)
            res = executor.rollback(ctx, RollbackRequest(args.env, ctx.deploy_id, args.to))
            _closing(err, res)
        elif args.command == "plan":
            res = executor.plan_only(ctx, _deploy_request(args, ctx.deploy_id))
            if not args.json:
                for note in res["notes"]:
                    err.print(f"  {note}")
                for n, step in enumerate(res["steps"], 1):
                    stdout.write(f"{n}. {step['kind']}: "
                                 + ", ".join(f"{k}={v}" for k, v in step.items()
                                             if k != "kind") + "\n")
                if not res["steps"]:
                    stdout.write("nothing to do\n")
        elif args.command == "status":
            res = executor.status(ctx)
            if not args.json:
                _print_status(Console(file=stdout, highlight=False, width=140), res)
        elif args.command == "history":
            res = executor.history(ctx)
            if not args.json:
                for e in res:
                    stdout.write(f"{e['at']}  {e['action']:<8} {e['from_release'] or '-'} -> "
                                 f"{e['release']}  (deploy {e['deploy_id']})"
                                 + (f"  {e['detail']}" if e.get("detail") else "") + "\n")
        elif args.command == "cleanup":
            res = executor.cleanup(ctx, keep=args.keep, images=args.images,
                                   break_lock=args.break_lock)
            if not res["steps"]:
                err.print("nothing to clean up")
        elif args.command == "destroy":
            res = executor.destroy(ctx, break_lock=args.break_lock)
        else:  # pragma: no cover - argparse enforces the choices
            raise AssertionError(args.command)
        if args.json:
            emit(res)
        return ExitCode.OK
    except KeyboardInterrupt as exc:  # Cancelled (a signal) or a plain KeyboardInterrupt
        name = exc.signame if isinstance(exc, Cancelled) else "SIGINT"
        err.print(f"[red]error:[/] interrupted by {name}; this run's changes were undone"
                  + "".join(f"; also: {n}" for n in getattr(exc, "__notes__", [])),
                  soft_wrap=True, markup=True)
        if args.json:
            emit({"error": also_text(exc) or f"interrupted by {name}", "type": "Cancelled"})
        return exc.exit_code if isinstance(exc, Cancelled) else ExitCode.INTERRUPTED
    except RolloutError as exc:
        err.print("[red]error:[/] ", end="")
        err.print(also_text(exc), soft_wrap=True, markup=False)
        if args.json:
            out = {"error": also_text(exc), "type": type(exc).__name__}
            if isinstance(exc, AnalysisFailed) and exc.verdict is not None:
                out.update(analysis=exc.verdict.to_dict(), rolled_back=exc.rolled_back)
            if isinstance(exc, DiffRefused) and exc.figures is not None:
                out["diff"] = exc.figures
            emit(out)
        return _code_for(exc)
    finally:
        stack.close()


def _code_for(exc: RolloutError) -> ExitCode:
    for cls, code in ((AnalysisFailed, ExitCode.ANALYSIS_FAILED), (PlanError, ExitCode.PLAN),
                      (DeployLocked, ExitCode.LOCKED),
                      (HealthCheckFailed, ExitCode.UNHEALTHY), (WaitTimeout, ExitCode.TIMEOUT),
                      (CloudError, ExitCode.CLOUD)):
        if isinstance(exc, cls):
            return code
    return ExitCode.ERROR


def _resolve_env_args(args: argparse.Namespace) -> None:
    """Defaults from the environment (validated like the flags; ValueError names the bad
    variable): ``MODELSERVE_ANALYSIS_WINDOW`` and ``MODELSERVE_NOTIFY_URL``."""
    if hasattr(args, "analysis_window") and args.analysis_window is None:
        text = os.environ.get(analysis.WINDOW_ENV, "").strip()
        try:
            args.analysis_window = (
                _float_in(0.0, 86400.0, analysis.WINDOW_ENV)(text) if text
                else analysis.DEFAULT_WINDOW_S)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"{analysis.WINDOW_ENV}: {exc}") from None
    if hasattr(args, "notify"):
        for url in notify.urls_from_env():
            if not notify.valid_url(url):
                raise ValueError(f"{notify.NOTIFY_ENV}: {notify.redact_url(url)!r} is not an "
                                 "http(s) URL")
            args.notify.append(url)


def _deploy_request(args: argparse.Namespace, deploy_id: str) -> DeployRequest:
    return DeployRequest(env=args.env, deploy_id=deploy_id, release=args.release,
                         workers=args.workers, keep=args.keep, force=args.force,
                         accuracy_tolerance=args.tolerance, min_accuracy=args.min_accuracy,
                         max_disagreement=args.max_disagreement,
                         diff_sample=tuple(args.diff_sample or ()),
                         preview=getattr(args, "preview", False))


def _closing(err: Console, res: dict) -> None:
    if not res["steps"]:
        err.print(f"[green]nothing to do[/]: {'; '.join(res['notes'])}")
        return
    probe = res.get("probe")
    probe_txt = (f", probe {probe['failed']} failed / {probe['total']}" if probe else "")
    verdict = res.get("analysis")
    if verdict:
        probe_txt += (f", analysis {verdict['outcome']}: {verdict['now']['requests']} requests, "
                      f"{verdict['now']['error_rate']:.2%} errors")
    if res["action"] == "preview":
        err.print(f"[bold green]preview ready[/]: {res['release']} at {res['preview']['url']}; "
                  f"{res['from_release'] or 'nothing'} stays live at {res['url']} "
                  f"({res['seconds']}s); then: python -m rollout promote --env {res['env']} | "
                  f"abort --env {res['env']}")
    elif res["action"] == "abort":
        err.print(f"[bold green]preview aborted[/]: {res['release']} is gone from {res['env']}; "
                  f"{res['from_release'] or 'nothing'} stays live ({res['seconds']}s)")
    else:
        err.print(f"[bold green]{res['action']} done[/]: {res['release']} is live in "
                  f"{res['env']} at {res['url']} ({res['seconds']}s{probe_txt})")
    for item in res.get("leftovers") or []:
        err.print(f"[yellow]left behind[/]: {item} — python -m rollout cleanup --env "
                  f"{res['env']}")


def main() -> None:
    """Console entry point."""
    sys.exit(run())
