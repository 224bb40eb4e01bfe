"""Shared test helpers: the committed bundle and valid rows built from its held-out sample.

``tests.lxd_guard``: every LXD test works in the project ``modelserve-test``, and the session
fails if the user's default LXD project changed (see that module).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.bundle import load_bundle

pytest_plugins = ["tests.lxd_guard"]


@pytest.fixture(scope="session")
def bundle():
    return load_bundle()


@pytest.fixture(scope="session")
def holdout(bundle):
    """(instances, probabilities) of the bundle's whole held-out sample."""
    sample = bundle.metadata["holdout_sample"]
    return [s["features"] for s in sample], [s["probability"] for s in sample]


@pytest.fixture
def receiver():
    """A real CloudEvents receiver on loopback: yields (url, list of received bodies)."""
    got: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            n = int(self.headers.get("Content-Length") or 0)
            got.append({"content_type": self.headers.get("Content-Type"),
                        **json.loads(self.rfile.read(n))})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/events", got
    srv.shutdown()
    srv.server_close()
