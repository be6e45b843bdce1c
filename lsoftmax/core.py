"""The numpy API of the core: GEMMs by numpy, the per-row margin work by the C++ core.

>>> import numpy as np
>>> from lsoftmax import core
>>> rng = np.random.default_rng(0)
>>> x, w = rng.standard_normal((8, 16)), rng.standard_normal((10, 16))
>>> y = rng.integers(0, 10, 8)
>>> logits = core.forward(x, w, y, margin=4, lam=0.0)
>>> gx, gw = core.backward(np.ones_like(logits), x, w, y, margin=4, lam=0.0)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from lsoftmax import _core
from lsoftmax._checks import check_features, float_matrix, int_labels

__all__ = [
    "backward",
    "forward",
    "get_num_threads",
    "margin_backward_",
    "margin_forward_",
    "set_num_threads",
]

margin_forward_ = _core.margin_forward_
margin_backward_ = _core.margin_backward_
set_num_threads = _core.set_num_threads
get_num_threads = _core.get_num_threads


def _check_pair(x: NDArray[Any], weight: NDArray[Any]) -> None:
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but weight is {weight.dtype}; they must match")
    check_features(x.shape[1], "weight", weight.shape[1], "(num_classes, in_features)")


def forward(
    x: NDArray[Any],
    weight: NDArray[Any],
    labels: Any = None,
    *,
    margin: int,
    lam: float = 0.0,
) -> NDArray[Any]:
    """Logits ``x @ weight.T``; with labels, the target logit of each row gets the margin."""
    x = float_matrix("x", x)
    weight = float_matrix("weight", weight)
    _check_pair(x, weight)
    _core.validate_margin_params(margin, lam)
    logits = np.matmul(x, weight.T)
    if labels is not None:
        _core.margin_forward_(logits, x, weight, int_labels(labels), margin, lam)
    return logits


def backward(
    grad_logits: NDArray[Any],
    x: NDArray[Any],
    weight: NDArray[Any],
    labels: Any,
    *,
    margin: int,
    lam: float,
) -> tuple[NDArray[Any], NDArray[Any]]:
    """Gradients ``(grad_x, grad_weight)`` of the margin logits for an incoming ``grad_logits``."""
    grad_logits = float_matrix("grad_logits", grad_logits)
    x = float_matrix("x", x)
    weight = float_matrix("weight", weight)
    _check_pair(x, weight)
    if grad_logits.dtype != x.dtype:
        raise TypeError(f"grad_logits is {grad_logits.dtype} but x is {x.dtype}; they must match")
    if grad_logits.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(
            f"grad_logits has shape {grad_logits.shape}, expected {(x.shape[0], weight.shape[0])}"
        )
    _core.validate_margin_params(margin, lam)
    grad_x = np.matmul(grad_logits, weight)
    grad_weight = np.matmul(grad_logits.T, x)
    _core.margin_backward_(
        grad_logits, x, weight, int_labels(labels), grad_x, grad_weight, margin, lam
    )
    return grad_x, grad_weight
