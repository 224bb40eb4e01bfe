"""The peers' model: the committed bundle (app/bundle) behind one tf.function, as a user would
write it by hand. Imports TensorFlow, Keras and NumPy only (the peers' venvs have no app deps).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
BUNDLE = Path(os.environ.get("MODELSERVE_BUNDLE_DIR") or Path(__file__).resolve().parents[2] / "app/bundle")
METADATA = json.loads((BUNDLE / "metadata.json").read_text())
FEATURES = [f["name"] for f in METADATA["features"]]
THRESHOLD = float(METADATA.get("threshold", 0.5))
MODEL_INFO = {"version": str(METADATA["version"]), "sha256": str(METADATA["sha256"])}


def load():
    """A function rows (float32 [N, 7], feature order) → probabilities (float32 [N])."""
    import keras
    import numpy as np
    import tensorflow as tf

    model = keras.saving.load_model(BUNDLE / "model.keras", compile=False)
    fn = tf.function(lambda x: model(x, training=False),
                     input_signature=[tf.TensorSpec([None, len(FEATURES)], tf.float32)])

    def predict(x):
        return fn(np.asarray(x, dtype=np.float32)).numpy().reshape(-1)

    predict([[0.0] * len(FEATURES)])  # trace now, not on the first request
    return predict


def response(probabilities) -> dict:
    """The body modelserve answers with (app/web.py)."""
    return {"predictions": [{"probability": round(float(p), 6), "label": int(p >= THRESHOLD)}
                            for p in probabilities], "model": MODEL_INFO}
