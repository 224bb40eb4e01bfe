"""Real blue-green deploys and the fault matrix on the local LXD cloud (project modelserve-test)."""
