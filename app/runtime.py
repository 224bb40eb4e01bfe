"""The model inside a worker process: loaded once (after fork), called through tf.function."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from app.bundle import Bundle

_lock = threading.Lock()
_runtime: ModelRuntime | None = None


class ModelRuntime:
    """A Keras model behind a compiled function with a fixed input signature (no retracing)."""

    def __init__(self, bundle: Bundle, threads: int = 1):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import numpy as np
        import tensorflow as tf

        # Each worker process is one of N on a small machine: one TF thread each avoids
        # oversubscribing the cores that RabbitMQ and the web process also need.
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        self._np = np
        self.bundle = bundle
        self.sha256 = bundle.sha256
        self.model = keras.saving.load_model(bundle.model_path, compile=False)
        n = len(bundle.feature_names)
        model = self.model
        self._fn = tf.function(lambda x: model(x, training=False),
                               input_signature=[tf.TensorSpec([None, n], tf.float32)])
        self.predict([[0.0] * n])  # trace once now, not on the first request

    def predict_array(self, rows):
        """Probabilities (float32 array) for rows given in feature order."""
        x = self._np.asarray(rows, dtype=self._np.float32)
        return self._fn(x).numpy().reshape(-1)

    def predict(self, rows: list[list[float]]) -> list[float]:
        """Probabilities for rows given in feature order, as Python floats."""
        return self.predict_array(rows).tolist()


def get_runtime(load: Callable[[], Bundle]) -> ModelRuntime:
    """The process-wide runtime, created (calling `load` for the bundle) on first use."""
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                _runtime = ModelRuntime(load())
    return _runtime
