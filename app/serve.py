"""Web entry point: `python -m app.serve` (waitress on MODELSERVE_HOST:MODELSERVE_PORT)."""

from __future__ import annotations

import logging
import signal
import sys

from app.limits import Drain, make_error_task


def make_server(app, config):
    """A waitress server whose limits match the app's: bodies over the app's limit are refused
    from their Content-Length (never buffered), idle or slow clients are cut off, and errors
    waitress answers itself are JSON like the app's."""
    import waitress.server
    from waitress.channel import HTTPChannel

    class Channel(HTTPChannel):
        error_task_class = make_error_task(HTTPChannel.error_task_class)

    server = waitress.server.create_server(
        app, host=config.host, port=config.port, threads=config.web_threads,
        connection_limit=config.connection_limit, channel_timeout=max(1, round(config.client_timeout)),
        cleanup_interval=max(1, min(10, round(config.client_timeout / 3))),
        max_request_body_size=config.max_body_bytes, max_request_header_size=16 * 1024,
        ident="modelserve", clear_untrusted_proxy_headers=True)
    server.channel_class = Channel
    return server


def main() -> int:
    from app.bundle import BundleError, load_bundle
    from app.config import ConfigError, load_config

    try:
        config = load_config()
        bundle = load_bundle(config.bundle_dir or None, verify=True)
    except (ConfigError, BundleError) as exc:
        print(f"modelserve-web: {exc}", file=sys.stderr)
        return 2
    from app.web import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Dispatcher threads wake on a socket read and need the GIL back at once; the default 5 ms
    # switch interval would add up to that much to every broker round trip under load.
    sys.setswitchinterval(0.0005)
    app = create_app(config, bundle)
    logging.getLogger("modelserve").info(
        "serving release %s (%s, %s) model %s on http://%s:%d", config.release, config.colour,
        config.role, bundle.sha256[:12], config.host, config.port)
    server = make_server(app, config)
    drain = Drain(server, read_timeout=config.client_timeout, grace=config.drain_seconds)
    # SIGTERM (systemd stop, a rollout retiring this instance): stop accepting, finish what
    # is in progress, then exit 0. SIGINT likewise.
    signal.signal(signal.SIGTERM, drain.stop)
    signal.signal(signal.SIGINT, drain.stop)
    drain.serve()
    logging.getLogger("modelserve").info("drained; closing broker connections")
    client = app.extensions["modelserve"]["client"]
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
