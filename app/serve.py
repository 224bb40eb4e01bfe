"""Web entry point: `python -m app.serve` (waitress on MODELSERVE_HOST:MODELSERVE_PORT)."""

from __future__ import annotations

import logging
import sys


def main() -> int:
    from app.bundle import BundleError, load_bundle
    from app.config import ConfigError, load_config

    try:
        config = load_config()
        bundle = load_bundle(config.bundle_dir or None, verify=True)
    except (ConfigError, BundleError) as exc:
        print(f"modelserve-web: {exc}", file=sys.stderr)
        return 2
    import waitress

    from app.web import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Dispatcher threads wake on a socket read and need the GIL back at once; the default 5 ms
    # switch interval would add up to that much to every broker round trip under load.
    sys.setswitchinterval(0.0005)
    app = create_app(config, bundle)
    logging.getLogger("modelserve").info(
        "serving release %s (%s, %s) model %s on http://%s:%d", config.release, config.colour,
        config.role, bundle.sha256[:12], config.host, config.port)
    waitress.serve(app, host=config.host, port=config.port, threads=config.web_threads,
                   connection_limit=1000, channel_timeout=30, ident="modelserve",
                   clear_untrusted_proxy_headers=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
