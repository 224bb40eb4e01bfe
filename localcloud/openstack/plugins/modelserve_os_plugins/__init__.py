"""Plugins loaded by the harness's Neutron and Nova (on PYTHONPATH, never in the app's venv)."""
