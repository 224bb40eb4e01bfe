"""Named retry policies, declared once (tenacity) and run with an injectable sleep.

A policy gives up when the real time since the first attempt OR the total time it asked to
sleep exceeds its budget: the second clause makes tests with a no-op ``sleep`` deterministic.
Waits are predicates that raise ``NotReady`` ("not ready yet") until the wanted state; a
wrong answer (``HealthCheckFailed``, ``CloudError``) is permanent and never retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import tenacity
from tenacity import (
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)
from tenacity.stop import stop_base

from rollout.errors import CloudUnavailable, RolloutError, TransientCloudError, WaitTimeout

log = logging.getLogger("rollout.retry")
T = TypeVar("T")


class FrontBusy(Exception):
    """A front answered 503 (overloaded, or its workers still warming up): ask again."""


class NotReady(Exception):
    """Raised by a wait predicate: the resource is not in the wanted state yet."""


class _stop_after_idle(stop_base):
    """Stop once the policy has slept ``budget`` seconds in total (real or injected sleep)."""

    def __init__(self, budget: float):
        self.budget = budget

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        upcoming = retry_state.upcoming_sleep or 0
        return retry_state.idle_for + upcoming > self.budget


@dataclass(frozen=True)
class Policy:
    """A named retry policy: what to retry, how long in total, how to back off."""

    name: str
    budget: float  # seconds, wall clock and slept
    wait_min: float
    wait_max: float
    retry_on: tuple[type[BaseException], ...]
    multiplier: float = 1.0
    give_up: type[RolloutError] = WaitTimeout  # raised when the budget is spent

    def with_budget(self, budget: float) -> Policy:
        """The same policy with another time budget (e.g. ``--timeout``)."""
        return replace(self, budget=budget)

    def run(
        self,
        fn: Callable[[], T],
        *,
        sleep: Callable[[float], None] = time.sleep,
        what: str = "",
    ) -> T:
        """Call ``fn`` until it returns, retrying ``retry_on``; on giving up raise
        ``self.give_up`` (``WaitTimeout`` for waits, ``CloudUnavailable`` for cloud calls)
        naming the policy and the last error (non-retried errors propagate)."""
        retrying = tenacity.Retrying(
            sleep=sleep,
            stop=stop_after_delay(self.budget) | _stop_after_idle(self.budget),
            wait=wait_exponential(multiplier=self.multiplier, min=self.wait_min, max=self.wait_max),
            retry=retry_if_exception_type(self.retry_on),
            before_sleep=tenacity.before_sleep_log(log, logging.DEBUG),
            reraise=False,
        )
        try:
            return retrying(fn)
        except tenacity.RetryError as exc:
            last = exc.last_attempt.exception()
            label = f"{what}: " if what else ""
            raise self.give_up(
                f"{label}gave up after {self.budget:g}s ({self.name}): {last}"
            ) from last


# The policies, by name. Budgets are generous upper bounds; tests inject sleep.
# one cloud API call (every call: rollout.bounded.BoundedCloud); giving up is a cloud error
CLOUD_CALL = Policy("cloud-call", budget=60, wait_min=0.5, wait_max=5,
                    retry_on=(TransientCloudError,), give_up=CloudUnavailable)
# boot and health waits poll cheap local calls: cap the back-off at 1 s (boot) and 0.3 s
# (gate: one GET /readyz on the new instance) so a deploy idles at most that long past the
# moment its instance is ready (at 1 s the gate's median idle was ~0.5 s of a 15 s deploy)
INSTANCE_BOOT = Policy("instance-boot", budget=180, wait_min=0.2, wait_max=1,
                       retry_on=(NotReady, TransientCloudError), multiplier=0.2)
HEALTH_GATE = Policy("health-gate", budget=240, wait_min=0.25, wait_max=0.3,
                     retry_on=(NotReady, TransientCloudError), multiplier=0.25)
ROLLBACK_HEALTH = Policy("rollback-health", budget=5, wait_min=0.1, wait_max=0.5,
                         retry_on=(NotReady, TransientCloudError), multiplier=0.1)
VERIFY_SWITCH = Policy("verify-switch", budget=20, wait_min=0.05, wait_max=0.5,
                       retry_on=(NotReady, TransientCloudError), multiplier=0.05)

# the model-diff gate's predictions: a front that answers 503 + Retry-After (a new front
# whose worker instances still compile their first batch, on a loaded machine) is asked again
DIFF_PREDICT = Policy("diff-predict", budget=60, wait_min=0.5, wait_max=5,
                      retry_on=(FrontBusy,))

POLICIES = {p.name: p for p in (CLOUD_CALL, INSTANCE_BOOT, HEALTH_GATE, ROLLBACK_HEALTH,
                                VERIFY_SWITCH, DIFF_PREDICT)}
