"""What the image says it is: /opt/modelserve/RELEASE.json, written by the bake.

image-scripts/install_app.sh writes it with the same values packer/bake.py puts in the image
properties (release, git sha, model sha256, app version, built_at, ...). /version reports it
so that the rollout gate compares what the image really holds with the image's properties,
not with the seed rollout itself wrote. A checkout (`make run`) has no such file: then
/version falls back to the config and says ``"image": null``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEFAULT_RELEASE_FILE = "/opt/modelserve/RELEASE.json"
#: the keys /version takes from the file (strings; others are passed through under "image")
IDENTITY_KEYS = ("release", "git_sha", "model_sha256", "app_version", "built_at")


def read_release_file(path: str | Path) -> tuple[dict[str, Any] | None, str]:
    """(the file's JSON object, "") or (None, why) when it is absent or unusable."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError) as exc:
        return None, f"{p}: unreadable: {exc}"
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in IDENTITY_KEYS):
        return None, f"{p}: not an object with string {', '.join(IDENTITY_KEYS)}"
    return doc, ""
