"""The local LXD cloud: set-up scripts and the project helper (project.py)."""
