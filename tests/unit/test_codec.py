"""The packed float32 task payload round-trips exactly and rejects inconsistent payloads."""

import numpy as np
import pytest

from app.codec import pack, unpack


def test_rows_round_trip_as_float32():
    rows = [[1, 89, 66, 23, 28.1, 0.167, 21], [0, 0, 0, 0, 0, 0, 0]]
    got = unpack(pack(rows))
    assert got.shape == (2, 7) and got.dtype == np.float32
    assert got.tolist() == np.asarray(rows, dtype=np.float32).tolist()


def test_probabilities_round_trip():
    probs = np.array([0.0038546934, 0.5, 1.0], dtype=np.float32)
    assert unpack(pack(probs)).tolist() == probs.tolist()


def test_size_mismatch_is_refused():
    payload = pack([[1.0, 2.0]])
    payload["shape"] = [3, 2]
    with pytest.raises(ValueError, match="holds 2 values"):
        unpack(payload)


def test_bad_base64_is_refused():
    with pytest.raises(ValueError):
        unpack({"f32": "not base64!", "shape": [1]})
