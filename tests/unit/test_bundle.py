"""Bundle loading: the committed bundle verifies; broken ones fail with a clear error."""

import json
import shutil

import pytest

from app.bundle import BundleError, load_bundle, sha256_file


def test_committed_bundle_verifies_and_is_complete(bundle):
    assert bundle.sha256 == sha256_file(bundle.model_path)
    assert bundle.feature_names == ["npreg", "glu", "bp", "skin", "bmi", "ped", "age"]
    m = bundle.metadata["metrics"]
    assert 0.7 <= m["accuracy"] <= 1 and 0.7 <= m["roc_auc"] <= 1
    assert len(bundle.metadata["holdout_sample"]) == m["holdout_rows"] == 332
    assert "holdout_sample" not in bundle.public_metadata()


@pytest.fixture
def copy(bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(bundle.path, dst)
    return dst


def test_corrupt_model_file_is_named(copy):
    with open(copy / "model.keras", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00corrupt")
    with pytest.raises(BundleError, match=r"model\.keras has sha256 .* corrupt"):
        load_bundle(copy)


def test_missing_model_file(copy):
    (copy / "model.keras").unlink()
    with pytest.raises(BundleError, match="model file missing"):
        load_bundle(copy)


def test_missing_metadata(copy):
    (copy / "metadata.json").unlink()
    with pytest.raises(BundleError, match="metadata missing"):
        load_bundle(copy)


def test_unreadable_metadata(copy):
    (copy / "metadata.json").write_text("{not json")
    with pytest.raises(BundleError, match="metadata unreadable"):
        load_bundle(copy)


def test_metadata_without_required_keys(copy):
    (copy / "metadata.json").write_text(json.dumps({"version": "1"}))
    with pytest.raises(BundleError, match="lacks sha256, features, metrics"):
        load_bundle(copy)


def test_web_side_load_skips_the_hash_but_not_the_metadata(copy):
    (copy / "model.keras").unlink()
    assert load_bundle(copy, verify=False).version == "1.0.0"
