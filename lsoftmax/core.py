"""The numpy API of the core: GEMMs by numpy, the per-row margin work by the C++ core.

>>> import numpy as np
>>> from lsoftmax import core
>>> rng = np.random.default_rng(0)
>>> x, w = rng.standard_normal((8, 16)), rng.standard_normal((10, 16))
>>> y = rng.integers(0, 10, 8)
>>> logits = core.forward(x, w, y, margin=4, lam=0.0)
>>> gx, gw = core.backward(np.ones_like(logits), x, w, y, margin=4, lam=0.0)

``margin`` is an int (L-Softmax) or any spec of :mod:`lsoftmax.margins`:

>>> from lsoftmax.margins import ArcFace
>>> logits = core.forward(x, w, y, margin=ArcFace(0.5, 64.0))
>>> gx, gw = core.backward(np.ones_like(logits), x, w, y, margin=ArcFace(0.5, 64.0), lam=0.0)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from lsoftmax import _core
from lsoftmax._checks import check_features, float_matrix, int_labels
from lsoftmax.margins import Margin, as_margin

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
    margin: int | Margin,
    lam: float = 0.0,
) -> NDArray[Any]:
    """The kind's plain logits (``x @ weight.T`` for L-Softmax, an int ``margin``); with labels,
    the target logit of each row gets the margin."""
    x = float_matrix("x", x)
    weight = float_matrix("weight", weight)
    _check_pair(x, weight)
    spec = as_margin(margin)
    _core.validate_margin_spec(spec.kind, spec.params(), lam)
    if spec.kind == "lsoftmax":
        logits = np.matmul(x, weight.T)
        if labels is not None:
            _core.margin_forward_(logits, x, weight, int_labels(labels), int(spec.params()[0]), lam)
        return logits
    logits = _plain_logits(x, weight, spec)
    if labels is not None:
        _core.margin_family_forward_(
            logits, x, weight, int_labels(labels), spec.kind, spec.params(), lam
        )
    return logits


def _normalized(a: NDArray[Any], normalize: bool) -> tuple[NDArray[Any], NDArray[Any]]:
    # (a / max(|a_i|, eps), |a_i|) by the core, or a itself with its norms.
    if normalize:
        return _core.normalize_rows(a)  # type: ignore[no-any-return]
    return a, np.sqrt(np.einsum("ij,ij->i", a, a))


def _plain_logits(x: NDArray[Any], weight: NDArray[Any], spec: Margin) -> NDArray[Any]:
    xa = _normalized(x, spec.normalizes_features)[0]
    wa = _normalized(weight, spec.normalizes_weights)[0]
    logits = np.matmul(xa, wa.T)
    if spec.normalizes_features:
        logits *= logits.dtype.type(spec.scale)
    return logits


def _unnormalize_grad(
    a: NDArray[Any], an: NDArray[Any], norms: NDArray[Any], g_an: NDArray[Any]
) -> NDArray[Any]:
    """The gradient w.r.t. ``a`` of a loss whose gradient w.r.t. ``an = a / max(|a|, eps)`` is
    ``g_an``: ``(g - an (an . g)) / |a|``, and ``g / eps`` on the rows below eps."""
    eps = _core.degenerate_norm(str(a.dtype))
    big = norms > eps
    proj = g_an - an * np.einsum("ij,ij->i", an, g_an)[:, None]
    return np.where(big[:, None], proj / np.where(big, norms, 1.0)[:, None], g_an / eps)


def _family_backward(
    g: NDArray[Any], x: NDArray[Any], w: NDArray[Any], labels: NDArray[Any], spec: Margin,
    lam: float,
) -> tuple[NDArray[Any], NDArray[Any]]:
    # The target logit of row i is a_i phi(c_i) with c_i = <xn_i, wn_t>; its plain value is
    # a_i c_i, so the gradient is the plain one plus that of a_i (phi(c_i) - c_i).
    xn, nx = _core.normalize_rows(x)
    wn, nw = _core.normalize_rows(w)
    s = spec.scale
    xa = xn if spec.normalizes_features else x
    wa = wn if spec.normalizes_weights else w
    g_xa = s * np.matmul(g, wa)
    g_wa = s * np.matmul(g.T, xa)
    n = x.shape[0]
    rows = np.arange(n)
    t = labels.astype(np.int64)
    eps = _core.degenerate_norm(str(x.dtype))
    live = (nx >= eps) & (nw[t] >= eps)
    c = np.clip(np.einsum("ij,ij->i", xn, wn[t]), -1.0, 1.0)
    phi, dphi = _core.margin_family_targets(spec.kind, spec.params(), lam, c)
    a = nx if spec.kind == "sphereface" else np.full(n, s, dtype=x.dtype)
    gt = np.where(live, g[rows, t], 0.0)
    k_c = a * (dphi - 1.0) * gt  # d/dc of a (phi - c)
    k_a = (phi - c) * gt  # d/da
    g_xn = k_c[:, None] * wn[t]
    g_wn = np.zeros_like(w)
    np.add.at(g_wn, t, k_c[:, None] * xn)
    if spec.normalizes_features:
        grad_x = _unnormalize_grad(x, xn, nx, g_xa + g_xn)
    else:  # sphereface: a = |x|, whose gradient is xn
        grad_x = g_xa + _unnormalize_grad(x, xn, nx, g_xn) + k_a[:, None] * xn
    grad_w = _unnormalize_grad(w, wn, nw, g_wa + g_wn)
    return grad_x.astype(x.dtype, copy=False), grad_w.astype(w.dtype, copy=False)


def backward(
    grad_logits: NDArray[Any],
    x: NDArray[Any],
    weight: NDArray[Any],
    labels: Any,
    *,
    margin: int | Margin,
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
    spec = as_margin(margin)
    _core.validate_margin_spec(spec.kind, spec.params(), lam)
    if spec.kind != "lsoftmax":
        labels = int_labels(labels)
        _core.check_labels(labels, x.shape[0], weight.shape[0])
        return _family_backward(grad_logits, x, weight, labels, spec, lam)
    margin = int(spec.params()[0])
    grad_x = np.matmul(grad_logits, weight)
    grad_weight = np.matmul(grad_logits.T, x)
    _core.margin_backward_(
        grad_logits, x, weight, int_labels(labels), grad_x, grad_weight, margin, lam
    )
    return grad_x, grad_weight
