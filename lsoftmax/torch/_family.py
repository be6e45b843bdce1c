"""The margin family's forward and backward on torch tensors (CPU and CUDA).

Torch does the normalizations and the GEMMs; the core does the per-row target math
(``phi(c)`` and ``phi'(c)`` of the kind, ``_kernels.margin_family_targets``). With
``c_i = <xn_i, wn_t>`` and the row scale ``a_i`` (``|x_i||w_t|``, ``|x_i|`` or ``s``), the
target logit is ``a_i phi(c_i)`` and its plain value ``a_i c_i``, so the backward is the plain
layer's plus the gradient of the per-row correction ``a_i (phi(c_i) - c_i)``: no N x C pass beyond
the two GEMMs. The numpy API (``lsoftmax.core``) applies the same formula with numpy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lsoftmax import _core
from lsoftmax.margins import kind_class
from lsoftmax.torch import _kernels


class _Parts(NamedTuple):
    xn: Tensor
    wn: Tensor
    nx: Tensor
    nw: Tensor
    xa: Tensor  # the GEMM's left operand: xn or x
    wa: Tensor  # the GEMM's right operand: wn or w
    scale: float
    eps: float


def _eps(t: Tensor) -> float:
    return float(_core.degenerate_norm("float64" if t.dtype == torch.float64 else "float32"))


def _parts(x: Tensor, weight: Tensor, kind: str, params: list[float]) -> _Parts:
    cls = kind_class(kind)
    eps = _eps(x)
    nx = torch.linalg.vector_norm(x, dim=1)
    nw = torch.linalg.vector_norm(weight, dim=1)
    xn = x / nx.clamp_min(eps)[:, None]
    wn = weight / nw.clamp_min(eps)[:, None]
    return _Parts(
        xn,
        wn,
        nx,
        nw,
        xn if cls.normalizes_features else x,
        wn if cls.normalizes_weights else weight,
        float(params[4]) if cls.normalizes_features else 1.0,
        eps,
    )


def _check_labels(labels: Tensor, rows: int, num_classes: int) -> None:
    if labels.device.type == "cpu":
        _core.check_labels(labels.detach().numpy(), rows, num_classes)
    elif bool(((labels < 0) | (labels >= num_classes)).any()):
        _core.check_labels(labels.detach().cpu().numpy(), rows, num_classes)


def _rows(
    p: _Parts, labels: Tensor, kind: str, params: list[float], lam: float | Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(t, c, phi, dphi, a, live) of every row."""
    t = labels.long()
    c = (p.xn * p.wn[t]).sum(dim=1).clamp(-1.0, 1.0)
    phi, dphi = _kernels.margin_family_targets(kind, params, lam, c)
    if kind == "lsoftmax":
        a = p.nx * p.nw[t]
    elif kind == "sphereface":
        a = p.nx
    else:
        a = torch.full_like(c, p.scale)
    live = (p.nx >= p.eps) & (p.nw[t] >= p.eps)
    return t, c, phi, dphi, a, live


def forward(
    x: Tensor,
    weight: Tensor,
    labels: Tensor | None,
    lam: float | Tensor,
    kind: str,
    params: list[float],
) -> Tensor:
    """The kind's plain logits; with labels, each row's target logit becomes a_i phi(c_i)."""
    _core.validate_margin_spec(kind, params, 0.0)
    p = _parts(x, weight, kind, params)
    logits = torch.mm(p.xa, p.wa.t())
    if p.scale != 1.0:
        logits = logits * p.scale
    if labels is None:
        return logits
    _check_labels(labels, x.shape[0], weight.shape[0])
    t, _, phi, _, a, live = _rows(p, labels, kind, params, lam)
    plain = logits.gather(1, t[:, None])[:, 0]
    target = torch.where(live, a * phi.to(a.dtype), plain)
    return logits.scatter_(1, t[:, None], target[:, None].to(logits.dtype))


def _unnormalize(an: Tensor, norms: Tensor, g: Tensor, eps: float) -> Tensor:
    # Gradient w.r.t. a of a loss whose gradient w.r.t. an = a / max(|a|, eps) is g.
    proj = g - an * (an * g).sum(dim=1, keepdim=True)
    big = (norms > eps)[:, None]
    return torch.where(big, proj / norms.clamp_min(eps)[:, None], g / eps)


def backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    labels: Tensor | None,
    lam: float | Tensor,
    kind: str,
    params: list[float],
) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_weight) of ``forward`` for the incoming gradient ``grad``."""
    cls = kind_class(kind)
    p = _parts(x, weight, kind, params)
    grad = grad.contiguous()
    g_xa = torch.mm(grad, p.wa)
    g_wa = torch.mm(grad.t(), p.xa)
    if p.scale != 1.0:
        g_xa, g_wa = g_xa * p.scale, g_wa * p.scale
    g_xn = torch.zeros_like(x)
    g_wn = torch.zeros_like(weight)
    g_nx = torch.zeros_like(p.nx)
    g_nw = torch.zeros_like(p.nw)
    if labels is not None:
        t, c, phi, dphi, a, live = _rows(p, labels, kind, params, lam)
        gt = torch.where(live, grad.gather(1, t[:, None])[:, 0], torch.zeros_like(c))
        k_c = (a * (dphi.to(a.dtype) - 1.0) * gt).to(x.dtype)  # d/dc of a (phi - c)
        k_a = ((phi.to(a.dtype) - c) * gt).to(x.dtype)  # d/da
        g_xn = k_c[:, None] * p.wn[t]
        g_wn = g_wn.index_add(0, t, k_c[:, None] * p.xn)
        if kind == "lsoftmax":
            g_nx = k_a * p.nw[t]
            g_nw = g_nw.index_add(0, t, k_a * p.nx)
        elif kind == "sphereface":
            g_nx = k_a
    if cls.normalizes_features:
        grad_x = _unnormalize(p.xn, p.nx, g_xa + g_xn, p.eps)
    else:
        grad_x = g_xa + _unnormalize(p.xn, p.nx, g_xn, p.eps) + g_nx[:, None] * p.xn
    if cls.normalizes_weights:
        grad_w = _unnormalize(p.wn, p.nw, g_wa + g_wn, p.eps)
    else:
        grad_w = g_wa + _unnormalize(p.wn, p.nw, g_wn, p.eps) + g_nw[:, None] * p.wn
    return grad_x, grad_w
