"""The ROC AUC used for the bundle's metrics agrees with the pairwise definition."""

import itertools
import random

import numpy as np

from app.train import roc_auc


def pairwise_auc(y, s):
    pos = [b for a, b in zip(y, s, strict=True) if a == 1]
    neg = [b for a, b in zip(y, s, strict=True) if a == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_matches_pairwise_count_with_ties():
    rng = random.Random(3)
    for _ in range(20):
        y = np.array([rng.randint(0, 1) for _ in range(40)] + [0, 1])
        s = np.array([rng.choice([0.1, 0.2, 0.5, 0.7, rng.random()]) for _ in range(42)])
        assert abs(roc_auc(y, s) - pairwise_auc(y, s)) < 1e-12


def test_quality_floor_is_majority_baseline_plus_margin():
    from app.train import quality_floor

    assert quality_floor([1, 0, 0, 0]) == (0.75, 0.8)
    assert quality_floor([1, 1, 1, 0], margin=0.1) == (0.75, 0.85)
    assert quality_floor(np.array([1.0, 0.0])) == (0.5, 0.55)
    assert quality_floor([1] * 10) == (1.0, 1.0)  # never above 1


def test_committed_bundle_records_its_floor_from_its_held_out_rows():
    import json
    from pathlib import Path

    meta = json.loads((Path(__file__).resolve().parents[2] / "app" / "bundle" /
                       "metadata.json").read_text())
    labels = [r["true"] for r in meta["holdout_sample"]]
    assert len(labels) == meta["holdout"]["rows"]
    from app.train import quality_floor

    assert (meta["majority_baseline"], meta["accuracy_floor"]) == quality_floor(labels)
    assert meta["metrics"]["accuracy"] > meta["accuracy_floor"]
