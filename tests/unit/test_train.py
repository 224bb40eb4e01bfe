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
