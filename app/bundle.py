"""The model bundle: model.keras + metadata.json. Loading metadata never imports TensorFlow."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent / "bundle"
MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"

# Feature order is the model's input order. Ranges are the documented valid inputs: wide enough
# for any real patient, narrow enough to reject unit mistakes (e.g. glucose in mmol/L * 1000).
FEATURES: tuple[dict[str, Any], ...] = (
    {"name": "npreg", "type": "integer", "min": 0, "max": 20, "doc": "number of pregnancies"},
    {"name": "glu", "type": "number", "min": 0, "max": 300, "doc": "plasma glucose (mg/dL)"},
    {"name": "bp", "type": "number", "min": 0, "max": 200, "doc": "diastolic blood pressure (mm Hg)"},
    {"name": "skin", "type": "number", "min": 0, "max": 100, "doc": "triceps skin fold (mm)"},
    {"name": "bmi", "type": "number", "min": 0, "max": 80, "doc": "body mass index (kg/m^2)"},
    {"name": "ped", "type": "number", "min": 0, "max": 3, "doc": "diabetes pedigree function"},
    {"name": "age", "type": "integer", "min": 0, "max": 120, "doc": "age (years)"},
)


class BundleError(Exception):
    """The bundle is missing, unreadable or does not match its own metadata."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: where it is and what its metadata says."""

    path: Path
    metadata: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def version(self) -> str:
        return str(self.metadata["version"])

    @property
    def sha256(self) -> str:
        return str(self.metadata["sha256"])

    @property
    def feature_names(self) -> list[str]:
        return [f["name"] for f in self.metadata["features"]]

    @property
    def threshold(self) -> float:
        return float(self.metadata.get("threshold", 0.5))

    def public_metadata(self) -> dict[str, Any]:
        """Metadata for the API: everything but the bulky held-out sample."""
        return {k: v for k, v in self.metadata.items() if k != "holdout_sample"}


_REQUIRED_KEYS = ("version", "sha256", "features", "metrics")


def load_bundle(path: str | Path | None = None, verify: bool = True) -> Bundle:
    """Read metadata.json and (if verify) check model.keras against its sha256."""
    bundle_dir = Path(path) if path else DEFAULT_BUNDLE_DIR
    meta_path = bundle_dir / METADATA_FILE
    model_path = bundle_dir / MODEL_FILE
    try:
        metadata = json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise BundleError(f"model bundle metadata missing: {meta_path}") from exc
    except (OSError, ValueError) as exc:
        raise BundleError(f"model bundle metadata unreadable: {meta_path}: {exc}") from exc
    if not isinstance(metadata, dict):
        raise BundleError(f"model bundle metadata is not a JSON object: {meta_path}")
    missing = [k for k in _REQUIRED_KEYS if k not in metadata]
    if missing:
        raise BundleError(f"model bundle metadata lacks {', '.join(missing)}: {meta_path}")
    if verify:
        if not model_path.is_file():
            raise BundleError(f"model file missing: {model_path}")
        actual = sha256_file(model_path)
        if actual != metadata["sha256"]:
            raise BundleError(
                f"model file {model_path} has sha256 {actual[:12]}…, metadata says "
                f"{str(metadata['sha256'])[:12]}…: the bundle is corrupt or mixed"
            )
    return Bundle(path=bundle_dir, metadata=metadata)
