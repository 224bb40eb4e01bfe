"""A real OpenStack control plane on loopback, for modelserve's OpenStack tests."""
