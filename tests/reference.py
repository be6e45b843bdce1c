"""An independent float64 reference of the L-Softmax layer, written with plain torch ops.

It takes a genuinely different route from the core: the angle comes from ``acos``, the segment
from ``k = floor(theta m / pi)`` and the margin from ``cos(m theta)`` directly (the core uses
thresholds on ``cos(theta)`` and Chebyshev recurrences). Gradients come from torch autograd on
this function, so the reference has no hand-written backward either.

Other test files (ONNX parity, CUDA) import ``lsoftmax_reference`` and ``max_rel_err``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "angle_rows",
    "family_reference",
    "lsoftmax_reference",
    "max_rel_err",
    "reference_with_grads",
    "segment_case",
]


def max_rel_err(a: Tensor | np.ndarray, ref: Tensor | np.ndarray) -> float:
    """Max relative error, the one parity metric of the tests: ``max|a - ref| / max|ref|``.

    Both are compared in float64; the denominator is the largest magnitude of the whole
    reference tensor (not elementwise), so entries near zero do not blow the ratio up.
    """
    a_t = torch.as_tensor(np.asarray(a) if isinstance(a, np.ndarray) else a).double()
    r_t = torch.as_tensor(np.asarray(ref) if isinstance(ref, np.ndarray) else ref).double()
    assert a_t.shape == r_t.shape, (a_t.shape, r_t.shape)
    scale = r_t.abs().max().item()
    diff = (a_t - r_t).abs().max().item()
    if scale == 0.0:
        return diff
    return diff / scale


def _straight_through_clamp(c: Tensor, lo: float, hi: float) -> Tensor:
    # Clamped value, identity gradient: at cos(theta) = +-1 exactly acos has an infinite slope,
    # so the value is pulled one ulp inside while the gradient still flows as for the identity
    # (the limit of the true gradient, which is finite there).
    return c + (c.clamp(lo, hi) - c).detach()


def lsoftmax_reference(
    x: Tensor, weight: Tensor, labels: Tensor, margin: int, lam: float
) -> Tensor:
    """L-Softmax margin logits in float64, differentiable in ``x`` and ``weight``.

    ``x`` is (N, D), ``weight`` is (C, D), ``labels`` is (N,) integer. Row i's target logit
    ``f = <x_i, w_t>`` becomes ``(lam f + |x_i||w_t| psi(theta)) / (1 + lam)`` with
    ``psi = (-1)^k cos(m theta) - 2k``; rows where ``|x_i||w_t| = 0`` keep ``f`` (no margin).
    Inputs of another float dtype are promoted to float64 (keeping the autograd graph).
    """
    x = x.to(torch.float64)
    weight = weight.to(torch.float64)
    labels = labels.to(torch.int64)
    logits = x @ weight.t()
    if margin == 1:
        return logits
    rows = torch.arange(x.shape[0])
    w_t = weight[labels]
    f = (x * w_t).sum(dim=1)
    prod = torch.linalg.vector_norm(x, dim=1) * torch.linalg.vector_norm(w_t, dim=1)
    degenerate = prod == 0
    safe_prod = torch.where(degenerate, torch.ones_like(prod), prod)
    eps = torch.finfo(torch.float64).eps
    c = _straight_through_clamp(f / safe_prod, -1.0 + eps, 1.0 - eps)
    theta = torch.acos(c)
    k = torch.floor(theta.detach() * margin / math.pi).clamp(0, margin - 1)
    sign = 1.0 - 2.0 * torch.remainder(k, 2)
    psi = sign * torch.cos(margin * theta) - 2.0 * k
    g = (lam * f + prod * psi) / (1.0 + lam)
    g = torch.where(degenerate, f, g)
    out = logits.clone()
    out[rows, labels] = g
    return out


def angle_rows(
    weight: Tensor, labels: Tensor, thetas: Tensor, norms: Tensor, seed: int = 0
) -> Tensor:
    """Rows x_i at angle ``thetas[i]`` to ``weight[labels[i]]``, with norm ``norms[i]``.

    Each x_i is ``cos(theta) u + sin(theta) v`` scaled, where u is the unit target weight and v a
    random unit vector orthogonal to it (needs D >= 2). Built in float64.
    """
    gen = torch.Generator().manual_seed(seed)
    w_t = weight.to(torch.float64)[labels]
    u = w_t / torch.linalg.vector_norm(w_t, dim=1, keepdim=True)
    r = torch.randn(w_t.shape, generator=gen, dtype=torch.float64)
    v = r - (r * u).sum(dim=1, keepdim=True) * u
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    th = thetas.to(torch.float64)[:, None]
    return norms.to(torch.float64)[:, None] * (torch.cos(th) * u + torch.sin(th) * v)


def segment_case(
    margin: int,
    *,
    per_segment: int = 2,
    num_classes: int = 4,
    features: int = 5,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Float64 ``(x, weight, labels, k)`` with ``per_segment`` rows inside every segment k.

    Row angles are drawn from the inner 80 % of ``[k pi/m, (k+1) pi/m]``, so every segment
    0..m-1 is covered and no row sits on a boundary; ``k`` is the intended segment of each row.
    """
    gen = torch.Generator().manual_seed(seed)
    n = margin * per_segment
    weight = torch.randn(num_classes, features, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    k = torch.arange(margin).repeat_interleave(per_segment)
    frac = 0.1 + 0.8 * torch.rand(n, generator=gen, dtype=torch.float64)
    thetas = (k + frac) * math.pi / margin
    norms = 0.5 + 1.5 * torch.rand(n, generator=gen, dtype=torch.float64)
    x = angle_rows(weight, labels, thetas, norms, seed=seed + 1)
    return x, weight, labels, k


def reference_with_grads(
    x: Tensor, weight: Tensor, labels: Tensor, margin: int, lam: float, grad_logits: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits, grad_x, grad_weight)`` of the reference in float64, the gradients by autograd
    for the incoming gradient ``grad_logits``."""
    xr = x.detach().to(torch.float64).requires_grad_(True)
    wr = weight.detach().to(torch.float64).requires_grad_(True)
    logits = lsoftmax_reference(xr, wr, labels, margin, lam)
    gx, gw = torch.autograd.grad(logits, (xr, wr), grad_logits.to(torch.float64))
    return logits.detach(), gx, gw


def family_reference(
    x: Tensor, weight: Tensor, labels: Tensor | None, kind: str, params: dict[str, float],
    lam: float = 0.0,
) -> Tensor:
    """Margin-family logits in float64 from the published formulas, differentiable by autograd.

    ``kind`` and ``params`` (``m``, ``s``, ``easy_margin``, ``m1``, ``m2``, ``m3``) as in
    ``lsoftmax.margins``. The angle comes from ``acos`` (the core works on cos(theta) with
    closed forms). Every row of x and weight must have a nonzero norm.
    """
    x = x.to(torch.float64)
    weight = weight.to(torch.float64)
    if kind == "lsoftmax":
        if labels is None:
            return x @ weight.t()
        return lsoftmax_reference(x, weight, labels, int(params["m"]), lam)
    nx = torch.linalg.vector_norm(x, dim=1)
    nw = torch.linalg.vector_norm(weight, dim=1)
    wn = weight / nw[:, None]
    if kind == "sphereface":
        a = nx
        cos = (x / nx[:, None]) @ wn.t()
    else:
        a = torch.full_like(nx, float(params["s"]))
        cos = (x / nx[:, None]) @ wn.t()
    logits = a[:, None] * cos
    if labels is None:
        return logits
    labels = labels.to(torch.int64)
    rows = torch.arange(x.shape[0])
    eps = torch.finfo(torch.float64).eps
    c = _straight_through_clamp(cos[rows, labels], -1.0 + eps, 1.0 - eps)
    theta = torch.acos(c)
    if kind == "sphereface":
        m = int(params["m"])
        k = torch.floor(theta.detach() * m / math.pi).clamp(0, m - 1)
        psi = (1.0 - 2.0 * torch.remainder(k, 2)) * torch.cos(m * theta) - 2.0 * k
        phi = (lam * c + psi) / (1.0 + lam)
    elif kind == "cosface":
        phi = c - float(params["m"])
    elif kind == "arcface":
        m = float(params["m"])
        arc = torch.cos(theta + m)
        if params.get("easy_margin", False):
            phi = torch.where(c > 0, arc, c)
        else:
            phi = torch.where(theta + m <= math.pi, arc, c - m * math.sin(m))
    elif kind == "combined":
        phi = torch.cos(params["m1"] * theta + params["m2"]) - params["m3"]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    out = logits.clone()
    out[rows, labels] = a * phi
    return out
