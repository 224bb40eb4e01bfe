"""Stand-in behaviours of an image, for the OpenStack tier's ProcessDriver (harness only).

On LXD a stand-in image carries its behaviour in its own files (``/opt/standin/degrade``,
``/opt/standin/flip``). The tier's "servers" run the real app from the checkout, so the
behaviour is a property of the Glance image instead, ``modelserve_standin_behaviour``:

* ``fail N`` -- N seconds after the first prediction it answered (the health gate's), every
  route except ``/metrics`` answers 500: a release that breaks once it is live;
* ``slow N`` -- likewise, but every such route answers 1.5 s late;
* ``flip``   -- every prediction answer carries probability 1-p and the opposite label: a
  release whose model flips every label (the model-diff gate's case).

``ProcessDriver`` runs a front of such an image as ``python -m localcloud.openstack.behave``
(with ``MODELSERVE_STANDIN_BEHAVIOUR`` set) instead of ``python -m app.serve``: this is
``app.serve`` itself, whose Flask app gets the behaviour as a request hook before waitress
serves it. Being a hook on the app (not a proxy in front of it), the app's own /metrics
counts what clients see: the 500s by route and status, the slow answers' latency. Nothing in
``app/`` or ``rollout/`` knows about it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

SPEC_ENV = "MODELSERVE_STANDIN_BEHAVIOUR"
SLOW_DELAY_S = 1.5
MODES = ("fail", "slow", "flip")


@dataclass(frozen=True)
class Spec:
    mode: str
    after: float = 0.0  # seconds after the first prediction (fail / slow)


def parse(text: str) -> Spec:
    """``fail N`` | ``slow N`` | ``flip`` (N >= 0 seconds); ValueError otherwise."""
    words = (text or "").split()
    if words == ["flip"]:
        return Spec("flip")
    if len(words) == 2 and words[0] in ("fail", "slow"):
        try:
            after = float(words[1])
        except ValueError:
            after = -1.0
        if after >= 0:
            return Spec(words[0], after)
    raise ValueError(f"stand-in behaviour {text!r} is not 'fail N', 'slow N' or 'flip'")


def _is_prediction(method: str, rule: str) -> bool:
    return method == "POST" and ("predict" in rule or "infer" in rule)


def flip_body(body: object) -> object:
    """A prediction answer with every probability p -> 1-p and every label -> 1-label."""
    if not isinstance(body, dict) or not isinstance(body.get("predictions"), list):
        return body
    out = []
    for p in body["predictions"]:
        if isinstance(p, dict) and "probability" in p and p.get("label") in (0, 1):
            p = {**p, "probability": round(1.0 - float(p["probability"]), 6),
                 "label": 1 - int(p["label"])}
        out.append(p)
    return {**body, "predictions": out}


class Behaviour:
    """The state of one front's behaviour: when it answered its first prediction."""

    def __init__(self, spec: Spec, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.spec, self.clock, self.sleep = spec, clock, sleep
        self.first: float | None = None
        self._lock = threading.Lock()

    def degraded(self) -> bool:
        return (self.spec.mode in ("fail", "slow") and self.first is not None
                and self.clock() - self.first >= self.spec.after)

    def answered_prediction(self) -> None:
        with self._lock:
            if self.first is None:
                self.first = self.clock()

    def install(self, app) -> None:
        """Hook the behaviour into a Flask app (before it served any request)."""
        from flask import jsonify, request

        @app.before_request
        def _standin_before():
            if request.path == "/metrics" or not self.degraded():
                return None
            if self.spec.mode == "fail":
                return jsonify({"error": {"type": "internal_error",
                                          "message": "degraded stand-in"}}), 500
            self.sleep(SLOW_DELAY_S)
            return None

        @app.after_request  # runs before the app's own counting hook (reverse order)
        def _standin_after(response):
            rule = request.url_rule.rule if request.url_rule else ""
            if _is_prediction(request.method, rule) and response.status_code == 200:
                self.answered_prediction()
                if self.spec.mode == "flip" and response.is_json:
                    response.set_data(json.dumps(flip_body(response.get_json())))
            return response


def main() -> int:
    try:
        spec = parse(os.environ.get(SPEC_ENV, ""))
    except ValueError as exc:
        print(f"modelserve-standin: {exc}", file=sys.stderr)
        return 2
    import app.serve as serve

    behaviour = Behaviour(spec)
    real_make_server = serve.make_server

    def make_server(app, config):
        behaviour.install(app)
        return real_make_server(app, config)

    serve.make_server = make_server
    print(f"modelserve-standin: behaviour {spec.mode} {spec.after:g}", file=sys.stderr, flush=True)
    return serve.main()


if __name__ == "__main__":
    sys.exit(main())
