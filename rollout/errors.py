"""The rollout error hierarchy: one root, a few meaningful children.

Every message says what happened *and* what to do next; cli.py prints ``str(err)`` as the
one-line error and maps the class to an exit status (see ``ExitCode`` in cli.py).
"""

from __future__ import annotations


class RolloutError(Exception):
    """Root of every error the rollout tool raises on purpose."""


class PlanError(RolloutError):
    """The request cannot be planned (unknown release, accuracy gate, nothing to roll back to)."""


class DiffRefused(PlanError):
    """The model-diff gate refused the new release: more of the held-out (and sample) rows
    flipped label between the live release and it than ``--max-disagreement`` allows (exit 3,
    after undo). ``figures``: the gate's figures (JSON-ready)."""

    def __init__(self, message: str, figures: dict | None = None):
        super().__init__(message)
        self.figures = figures


class DeployLocked(RolloutError):
    """Another deploy holds the environment's lock."""

    def __init__(self, env: str, holder: str, since: str, deploy_id: str):
        self.env, self.holder, self.since, self.deploy_id = env, holder, since, deploy_id
        super().__init__(
            f"environment {env!r} is locked by {holder} since {since} (deploy {deploy_id}); "
            f"wait for it, or if that run is dead: python -m rollout cleanup --env {env} "
            "--break-lock"
        )


class HealthCheckFailed(RolloutError):
    """An instance did not pass the health gate (readyz, prediction, model sha256, version)."""


class AnalysisFailed(RolloutError):
    """The post-switch analysis found the new release worse than the baseline (exit 8); the
    floating IP was switched back to the previous live release (or, with none, left)."""

    def __init__(self, message: str, verdict: object = None, rolled_back: bool = True):
        super().__init__(message)
        self.verdict, self.rolled_back = verdict, rolled_back


class CloudError(RolloutError):
    """A cloud API call failed permanently (bad request, quota, instance in ERROR)."""


class AuthError(CloudError):
    """Authentication or authorisation failed (HTTP 401/403, keystone Unauthorized).

    Permanent: never retried (each retry is one more failed login towards a lockout policy)."""


class CloudUnavailable(CloudError):
    """Transient cloud errors went on beyond the retry budget (exit 6, like any CloudError)."""


class TransientCloudError(CloudError):
    """A cloud API call failed in a way worth retrying (timeout, 5xx, connection reset)."""


class NotFound(CloudError):
    """``get_*`` did not find the named resource (``find_*`` returns None instead)."""


class Conflict(CloudError):
    """A compare-and-swap update lost: the resource changed since it was observed."""


class StaleObservation(Conflict):
    """A lock-free compare-and-swap (rollback's one-update switch) lost: the floating IP
    changed after it was observed, so the observation may no longer hold. Nothing moved."""


class WaitTimeout(RolloutError):
    """A ``wait_for_*`` gave up: the resource did not reach the wanted state in time."""


class Cancelled(KeyboardInterrupt):
    """A signal (SIGINT, SIGTERM, SIGHUP) asked the run to stop; raised in the main thread
    by the handlers ``rollout.cancel`` installs. A ``KeyboardInterrupt`` (a BaseException), so
    no ``except Exception`` swallows it. Exit status 128 + signal number (130/143/129)."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        try:
            self.signame = signal.Signals(signum).name
        except ValueError:
            self.signame = f"signal {signum}"
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {self.signame}")


def add_also(exc: BaseException, text: str) -> None:
    """Report ``text`` (an error met while undoing or unlocking) beside ``exc``, never instead
    of it: the CLI prints ``<exc>; also: <text>``."""
    exc.add_note(text)


def also_text(exc: BaseException) -> str:
    """``exc`` as one line with its notes (``add_also``) appended."""
    notes = getattr(exc, "__notes__", None) or []
    return str(exc) + "".join(f"; also: {n}" for n in notes)
