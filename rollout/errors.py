"""The rollout error hierarchy: one root, a few meaningful children.

Every message says what happened *and* what to do next; cli.py prints ``str(err)`` as the
one-line error and maps the class to an exit status (see ``ExitCode`` in cli.py).
"""

from __future__ import annotations


class RolloutError(Exception):
    """Root of every error the rollout tool raises on purpose."""


class PlanError(RolloutError):
    """The request cannot be planned (unknown release, accuracy gate, nothing to roll back to)."""


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


class CloudError(RolloutError):
    """A cloud API call failed permanently (bad request, quota, instance in ERROR)."""


class TransientCloudError(CloudError):
    """A cloud API call failed in a way worth retrying (timeout, 5xx, connection reset)."""


class NotFound(CloudError):
    """``get_*`` did not find the named resource (``find_*`` returns None instead)."""


class Conflict(CloudError):
    """A compare-and-swap update lost: the resource changed since it was observed."""


class WaitTimeout(RolloutError):
    """A ``wait_for_*`` gave up: the resource did not reach the wanted state in time."""


class Cancelled(RolloutError):
    """The operator pressed Ctrl-C; cleanup has run."""
