"""Serve one OpenStack WSGI module with gunicorn (run by the harness's OpenStack venv).

usage: python wsgi_serve.py MODULE HOST:PORT [THREADS]

oslo.config parses sys.argv when a service module is imported and exits 2 on gunicorn's
flags, so argv is cleared before anything OpenStack is imported; the config files come from
the OS_*_CONFIG_DIR/FILES environment variables the harness sets.
"""

import importlib
import sys


def main():
    """Parse our three arguments, clear argv, run gunicorn in this process."""
    module, bind = sys.argv[1], sys.argv[2]
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 4
    sys.argv = [sys.argv[0]]

    from gunicorn.app.base import BaseApplication

    class App(BaseApplication):
        def load_config(self):
            for key, value in {
                "bind": bind, "workers": 1, "threads": threads, "worker_class": "gthread",
                "timeout": 120, "graceful_timeout": 5, "accesslog": None,
                "control_socket_disable": True, "proc_name": f"modelserve-os:{module}",
            }.items():
                if key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self):
            return importlib.import_module(module).application

    App().run()


if __name__ == "__main__":
    main()
