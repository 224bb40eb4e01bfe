"""``python -m rollout`` — see rollout/cli.py."""

from rollout.cli import main

main()
