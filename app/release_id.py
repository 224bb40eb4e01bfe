"""The release id grammar, defined once for the bake, the deploy tool, the seed and the app.

A release id names an image (``modelserve-<release>``), instance names and a DNS label, so it is
one: lowercase letters, digits and '-', 1 to 30 characters, starting and ending with a letter
or digit (``r20261128-0630-7c1bfb0``, ``g7c1bfb0``, ``e2e-a``). Stdlib only: packer/bake.py
imports it with the host's python3.
"""

from __future__ import annotations

import re

PATTERN = r"[a-z0-9](?:[a-z0-9-]{0,28}[a-z0-9])?"
RULE = ("lowercase letters, digits and '-', 1-30 characters, starting and ending with a letter "
        "or digit")
_RELEASE = re.compile(PATTERN)


def is_release_id(text: str) -> bool:
    """True when ``text`` is a valid release id."""
    return isinstance(text, str) and _RELEASE.fullmatch(text) is not None


def check_release_id(text: str) -> str:
    """``text`` if it is a valid release id, else ValueError naming the rule."""
    if not is_release_id(text):
        raise ValueError(f"release {text!r}: {RULE}")
    return text
