"""Argument checks shared by the Python APIs (numpy, device arrays, torch)."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_INTS = (np.dtype(np.int32), np.dtype(np.int64))


def float_matrix(name: str, a: Any) -> NDArray[np.floating[Any]]:
    """``a`` itself when it is a 2-D float32/float64 numpy array; TypeError/ValueError otherwise."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
    return a


def int_labels(labels: Any) -> NDArray[np.integer[Any]]:
    """``labels`` as an int32/int64 array (no copy when it is one); TypeError otherwise."""
    arr = np.asarray(labels)
    if arr.dtype not in _INTS:
        raise TypeError(f"labels must be int32 or int64, got {arr.dtype}")
    return arr


def check_features(x_features: int, name: str, features: int, layout: str) -> None:
    """ValueError unless ``x`` has as many features per row as ``name`` (laid out as ``layout``)."""
    if x_features != features:
        raise ValueError(
            f"x has {x_features} features but {name} has {features} ({name} must be {layout})"
        )
