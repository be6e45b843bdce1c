"""The numpy API of the L-GM core: GEMMs by numpy, the assembly by the C++ core.

>>> import numpy as np
>>> from lsoftmax import lgm_core
>>> rng = np.random.default_rng(0)
>>> x, means = rng.standard_normal((8, 4)), rng.standard_normal((3, 4))
>>> log_var = np.zeros((3, 4))
>>> y = rng.integers(0, 3, 8)
>>> logits, loglik = lgm_core.lgm_forward(x, means, log_var, y, alpha=1.0)
>>> gx, gm, glv = lgm_core.lgm_backward(
...     np.ones_like(logits), None, logits, x, means, log_var, y, alpha=1.0)

Logits ``z_ik = -(1 + alpha [k = y_i]) d_ik - [include_logdet] 1/2 log|V_k|`` with
``d_ik = 1/2 sum_j (x_ij - mu_kj)^2 / v_kj``; ``loglik[i] = -(d_ic + 1/2 log|V_c|)`` for the label
``c = y_i``, or for the predicted class when no labels are given. ``log_var`` is ``(C, D)``
(diagonal variances) or ``(C, 1)`` (isotropic). See docs/lgm.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from lsoftmax import _core
from lsoftmax._checks import check_features, float_matrix, int_labels

__all__ = ["lgm_backward", "lgm_forward", "log_var_from_variances"]


def _labels(labels: Any) -> NDArray[Any] | None:
    return None if labels is None else int_labels(labels)


def _check(x: NDArray[Any], means: NDArray[Any], log_var: NDArray[Any]) -> None:
    for name, a in (("means", means), ("log_var", log_var)):
        if a.dtype != x.dtype:
            raise TypeError(f"{name} is {a.dtype} but x is {x.dtype}; they must match")
    check_features(x.shape[1], "means", means.shape[1], "(num_classes, feat_dim)")


def log_var_from_variances(variances: NDArray[Any]) -> NDArray[Any]:
    """``log(variances)`` after checking that every variance is finite and > 0."""
    return _core.lgm_log_var_from_variances(float_matrix("variances", variances))


def _diagonal(x: NDArray[Any], log_var: NDArray[Any]) -> bool:
    return log_var.shape[1] == x.shape[1]


def lgm_forward(
    x: NDArray[Any],
    means: NDArray[Any],
    log_var: NDArray[Any] | None = None,
    labels: Any = None,
    *,
    alpha: float = 0.0,
    include_logdet: bool = True,
    variances: NDArray[Any] | None = None,
) -> tuple[NDArray[Any], NDArray[Any]]:
    """``(logits, loglik)``; with labels, ``alpha`` is the margin on each label's logit.

    Give either ``log_var`` or ``variances`` (then checked to be > 0).
    """
    x = float_matrix("x", x)
    means = float_matrix("means", means)
    if (log_var is None) == (variances is None):
        raise ValueError("give exactly one of log_var and variances")
    if variances is not None:
        log_var = log_var_from_variances(variances)
    assert log_var is not None
    log_var = float_matrix("log_var", log_var)
    _check(x, means, log_var)
    _core.validate_lgm_alpha(alpha)
    offset, precision, scaled_means = _core.lgm_prepare(means, log_var)
    xc = x - offset
    logits = xc @ scaled_means.T
    sq_term = np.square(xc) @ precision.T if _diagonal(x, log_var) else None
    loglik = np.empty(x.shape[0], dtype=x.dtype)
    _core.lgm_forward_(
        logits, loglik, x, means, log_var, offset, sq_term, _labels(labels), alpha, include_logdet
    )
    return logits, loglik


def lgm_backward(
    grad_logits: NDArray[Any],
    grad_loglik: NDArray[Any] | None,
    logits: NDArray[Any],
    x: NDArray[Any],
    means: NDArray[Any],
    log_var: NDArray[Any],
    labels: Any = None,
    *,
    alpha: float = 0.0,
    include_logdet: bool = True,
) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
    """``(grad_x, grad_means, grad_log_var)`` for incoming gradients of ``lgm_forward``'s outputs.

    ``logits`` is ``lgm_forward``'s output for the same inputs (it fixes the predicted class of
    rows without labels); ``grad_loglik`` may be None.
    """
    grad_logits = float_matrix("grad_logits", grad_logits)
    logits = float_matrix("logits", logits)
    x = float_matrix("x", x)
    means = float_matrix("means", means)
    log_var = float_matrix("log_var", log_var)
    _check(x, means, log_var)
    expected = (x.shape[0], means.shape[0])
    for name, a in (("grad_logits", grad_logits), ("logits", logits)):
        if a.dtype != x.dtype:
            raise TypeError(f"{name} is {a.dtype} but x is {x.dtype}; they must match")
        if a.shape != expected:
            raise ValueError(f"{name} has shape {a.shape}, expected {expected}")
    offset, precision, scaled_means = _core.lgm_prepare(means, log_var)
    coeff, colsum, grad_h, own, cls = _core.lgm_backward_coeffs(
        grad_logits,
        grad_loglik,
        logits,
        log_var,
        x.shape[1],
        _labels(labels),
        alpha,
        include_logdet,
    )
    xc = x - offset
    sq = np.square(xc)
    if not _diagonal(x, log_var):
        sq = sq.sum(axis=1, keepdims=True)
    return _core.lgm_backward_assemble(
        x,
        means,
        log_var,
        offset,
        colsum,
        grad_h,
        own,
        cls,
        coeff @ precision,
        coeff @ scaled_means,
        coeff.T @ xc,
        coeff.T @ sq,
    )
