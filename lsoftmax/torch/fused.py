"""Fused margin cross-entropy: the loss of the margin logits without the N x C logits.

``margin_cross_entropy(x, weight, target, margin, lam=...)`` equals
``F.cross_entropy(margin_logits(x, weight, target, margin, lam), target)`` for every kind of
``lsoftmax.margins`` (an int ``margin`` is ``LSoftmax(margin)``) but streams over blocks of
classes: each block's logits ``(xe @ W_block.T) * inv_block`` (an N x B GEMM by torch, scaled by
the block's C-vector of inverse row norms for the kinds that normalize W) are folded into a
per-row online log-sum-exp by the core (``fused_lse_block``) and dropped. ``xe`` is x, or
``s x / max(|x|, eps)`` for the kinds that normalize the features (an N x D tensor). The
backward recomputes each block and has the core turn it into ``scale * (softmax - onehot)``
(``fused_grad_block``) before the block's two gradient GEMMs. Memory beyond the inputs and
``grad_weight``: one N x B block (and a B x D one for the normalizing kinds), ``grad_x`` and a
few N- and C-vectors; neither the N x C logits nor a normalized copy of W.

Why recompute rather than compute the gradient in the forward: the gradient needs each row's
final log-sum-exp, which is known only after the last block, so a one-pass gradient would have
to keep every block (N x C) or rescale ``grad_weight`` per row and class; the two-pass variant
(log-sum-exp pass, then a gradient pass inside the forward) does the same four GEMMs as
recomputing in the backward, and would also keep a C x D gradient alive between forward and
backward. Recomputing costs one extra N x B x D GEMM per block (4 GEMMs against the unfused
path's 3) and saves the N x C passes and allocations (see docs/huge.md for the measurements).

The margin is the family's (``lsoftmax.margins``, core math in ``margin_family.h``): each row's
target logit ``a_i phi(c_i)`` takes ``phi`` and ``phi'`` from the core
(``_kernels.margin_family_targets``) on the N target cosines; torch computes those cosines, the
row scales and, by autograd over N x D tensors only, the gradient of the difference between the
target logit and the block's plain value of that entry. The streaming part does not know about
margins beyond the scaling of the block.

The pieces (``prepare``, ``stream_lse``, ``stream_grad``) are public to this package so that the
class-sharded head (``lsoftmax.torch.distributed``) runs the same kernels on its shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lsoftmax import _core
from lsoftmax.margins import LSoftmax, Margin
from lsoftmax.torch import _kernels
from lsoftmax.torch.checks import check_inputs, check_lam_arg, check_lambda, check_margin
from lsoftmax.torch.modules import MarginLinear

__all__ = [
    "MarginCrossEntropy",
    "Prepared",
    "default_chunk_size",
    "margin_cross_entropy",
    "prepare",
    "resolve_margin",
    "stream_grad",
    "stream_lse",
]

_REDUCTIONS = ("mean", "sum", "none")
# A block of about this many logits (4 MiB in float32) stays in the L2 cache between the GEMM
# that writes it and the kernel that reads it; see docs/huge.md for the measured choice.
_BLOCK_ELEMENTS = 1 << 20
_MIN_CHUNK = 256


def default_chunk_size(rows: int, num_classes: int) -> int:
    """Classes per block when ``chunk_size`` is not given."""
    return max(1, min(num_classes, max(_MIN_CHUNK, _BLOCK_ELEMENTS // max(rows, 1))))


def check_chunk_size(chunk_size: object, rows: int, num_classes: int) -> int:
    if chunk_size is None:
        return default_chunk_size(rows, num_classes)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return min(chunk_size, max(num_classes, 1))


def check_reduction(reduction: object) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return str(reduction)


# --- the margin of any kind (the only margin-specific step) ------------------------------------


def resolve_margin(margin: object) -> Margin:
    """A ``lsoftmax.margins`` spec as it is; an int ``m`` as ``LSoftmax(m)`` (today's meaning)."""
    if isinstance(margin, Margin):
        return margin
    return LSoftmax(check_margin(margin))


def _eps(t: Tensor) -> float:
    return float(_core.degenerate_norm("float64" if t.dtype == torch.float64 else "float32"))


def inverse_norms(weight: Tensor, margin: Margin) -> Tensor | None:
    """``1 / max(|w_j|, eps)`` of every class for the kinds that normalize W (C values: the
    normalized W itself is never built), else None."""
    if not margin.normalizes_weights:
        return None
    return torch.linalg.vector_norm(weight, dim=1).clamp_min(_eps(weight)).reciprocal()


def _check_owned_labels(labels: Tensor, num_classes: int) -> None:
    # Checked before indexing the weight with them (the core would name the same row).
    if labels.numel() and labels.device.type == "cpu":
        bad = (labels < 0) | (labels >= num_classes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels[{i}] = {int(labels[i])} is out of range [0, {num_classes})")


def _scale(margin: Margin) -> float:
    return float(margin.params()[4]) if margin.normalizes_features else 1.0


class _Phi(torch.autograd.Function):
    """phi(c) of the kind, by the core (``_kernels.margin_family_targets``), with phi'(c)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, c: Tensor, margin: Margin, lam: float | Tensor
    ) -> Tensor:
        phi, dphi = _kernels.margin_family_targets(margin.kind, margin.params(), lam, c)
        ctx.save_for_backward(dphi.to(c.dtype))
        return phi.to(c.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (dphi,) = ctx.saved_tensors
        return g * dphi, None, None


@dataclass
class Prepared:
    """One call's inputs as the streaming passes see them, and the small graphs of its backward.

    The block logits are ``(xe @ W_block.T) * inv_block``: ``xe`` is x (lsoftmax, sphereface)
    or ``s x / max(|x|, eps)`` (cosine kinds), ``inv`` the per-class inverse norms (None for
    lsoftmax). ``target`` holds each owned row's margin target logit ``a_i phi(c_i)`` (the plain
    one for degenerate rows and without a margin; 0 for rows not owned). ``backward`` turns the
    gradient w.r.t. ``xe`` and dL/d(target logit) into the gradient w.r.t. x, and adds the target
    rows' terms to ``grad_weight``.
    """

    xe: Tensor
    inv: Tensor | None
    target: Tensor
    rows: Tensor | None  # owned rows (None: all)
    labels: Tensor  # labels of the owned rows, relative to the weight
    # small autograd graphs (N x D at most), built in the forward
    x_leaf: Tensor
    xe_graph: Tensor | None  # None: xe is x itself
    wy_leaf: Tensor | None
    correction: Tensor | None  # target - plain block value of the owned rows

    def backward(self, grad_xe: Tensor, target_grad: Tensor, grad_weight: Tensor) -> Tensor:
        outputs, grads = [], []
        if self.xe_graph is not None:
            outputs.append(self.xe_graph)
            grads.append(grad_xe)
        if self.correction is not None:
            g = target_grad if self.rows is None else target_grad.index_select(0, self.rows)
            outputs.append(self.correction)
            grads.append(g.to(self.correction.dtype))
        inputs = [self.x_leaf] + ([self.wy_leaf] if self.correction is not None else [])
        if not outputs:
            return grad_xe
        # retain_graph: the outer backward may run more than once (gradcheck, retain_graph);
        # the graph is N x D at most and goes with the autograd context.
        got = torch.autograd.grad(outputs, inputs, grads, retain_graph=True, allow_unused=True)
        grad_x = grad_xe if self.xe_graph is None else torch.zeros_like(grad_xe)
        if got[0] is not None:
            grad_x = grad_x + got[0]
        if self.correction is not None and got[1] is not None:
            grad_weight.index_add_(0, self.labels, got[1].to(grad_weight.dtype))
        return grad_x


def prepare(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: Margin,
    lam: float | Tensor,
    rows: Tensor | None = None,
    apply_margin: bool = True,
) -> Prepared:
    """``Prepared`` for rows ``rows`` (all when None) owning their class, ``labels`` relative to
    ``weight`` (the labels of the owned rows are checked against ``[0, weight.shape[0])``)."""
    ys = labels if rows is None else labels.index_select(0, rows)
    _check_owned_labels(ys, weight.shape[0])
    eps, s = _eps(x), _scale(margin)
    inv = inverse_norms(weight, margin)
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_()
        nx = torch.linalg.vector_norm(x_leaf, dim=1)
        xe_graph = None
        if margin.normalizes_features:
            xe_graph = x_leaf * (s / nx.clamp_min(eps))[:, None]
        xe = x if xe_graph is None else xe_graph.detach()
        wy_leaf = weight.detach().index_select(0, ys.long()).requires_grad_()
        # The N target values in float64, as the core computes the L-Softmax target (cosine and
        # norms of the raw rows in double); cast to the input dtype at the end.
        xs = (x_leaf if rows is None else x_leaf.index_select(0, rows)).double()
        xes = xe_graph if xe_graph is not None else x_leaf
        xes = (xes if rows is None else xes.index_select(0, rows)).double()
        wy = wy_leaf.double()
        dot = (xes * wy).sum(dim=1)
        nws = torch.linalg.vector_norm(wy, dim=1)
        # The block's value of the target entry, as a function of x and w_y.
        plain = dot if inv is None else dot / nws.clamp_min(eps)
        correction = None
        if apply_margin:
            nxs = torch.linalg.vector_norm(xs, dim=1)
            xn = xs / nxs.clamp_min(eps)[:, None]
            wn = wy / nws.clamp_min(eps)[:, None]
            c_raw = (xn * wn).sum(dim=1)
            # Clamped for phi, the gradient passed through (as the unfused layer's backward).
            c = c_raw + (c_raw.clamp(-1.0, 1.0) - c_raw).detach()
            phi = _Phi.apply(c, margin, lam)
            if margin.kind == "lsoftmax":
                a = nxs * nws
            elif margin.kind == "sphereface":
                a = nxs
            else:
                a = torch.full_like(c, s)
            live = (nxs >= eps) & (nws >= eps)
            correction = torch.where(live, a * phi - plain, torch.zeros_like(plain))
            t = (plain + correction).detach().to(x.dtype)
        else:
            t = plain.detach().to(x.dtype)
    if rows is None:
        target = t
    else:
        target = x.new_zeros(x.shape[0])
        target.index_copy_(0, rows, t)
    return Prepared(
        xe=xe.contiguous(), inv=inv, target=target, rows=rows, labels=ys, x_leaf=x_leaf,
        xe_graph=xe_graph, wy_leaf=wy_leaf if correction is not None else None,
        correction=correction,
    )


# --- streaming over blocks of classes ---------------------------------------------------------


def _blocks(num_classes: int, chunk: int) -> range:
    return range(0, num_classes, chunk)


def _block_buffer(x: Tensor, chunk: int) -> Tensor:
    return torch.empty(x.shape[0] * chunk, dtype=x.dtype, device=x.device)


def _block_logits(x: Tensor, w_block: Tensor, buf: Tensor) -> Tensor:
    out = buf[: x.shape[0] * w_block.shape[0]].view(x.shape[0], w_block.shape[0])
    return torch.mm(x, w_block.t(), out=out)


def _np(t: Tensor) -> Any:
    return t.detach().numpy()


def stream_lse(
    xe: Tensor,
    weight: Tensor,
    inv: Tensor | None,
    labels: Tensor,
    target_logits: Tensor,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """Per-row (max, sum of exp(v - max)) over the classes of ``weight``, float64.

    ``v`` is ``(xe @ weight.T) * inv`` (``inv`` None: 1) with entry ``(i, labels[i])`` replaced
    by ``target_logits[i]`` where ``labels[i]`` is in range (other rows have no target here).
    """
    n = xe.shape[0]
    row_max = torch.full((n,), -math.inf, dtype=torch.float64, device=xe.device)
    row_sum = torch.zeros(n, dtype=torch.float64, device=xe.device)
    buf = _block_buffer(xe, chunk)
    cuda = xe.device.type == "cuda"
    for c0 in _blocks(weight.shape[0], chunk):
        block = _block_logits(xe, weight[c0 : c0 + chunk], buf)
        if inv is not None:
            block.mul_(inv[c0 : c0 + chunk])
        if cuda:
            _core.cuda_fused_lse_block_(
                _kernels._mat("block", block), _kernels._vec(labels), c0,
                target_logits.data_ptr(), row_max.data_ptr(), row_sum.data_ptr(),
                stream=torch.cuda.current_stream(xe.device).cuda_stream,
            )
        else:
            _core.fused_lse_block_(
                _np(block), _np(labels), c0, _np(target_logits), _np(row_max), _np(row_sum),
                torch_pool=_kernels.TORCH_OPS,
            )
    return row_max, row_sum


def stream_grad(
    xe: Tensor,
    weight: Tensor,
    inv: Tensor | None,
    labels: Tensor,
    target_logits: Tensor,
    lse: Tensor,
    scale: Tensor,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """(grad_xe, grad_weight) of ``sum_i scale_i * CE_i`` through the block logits of
    ``stream_lse``, the target entries treated as plain ones (``Prepared.backward`` adds the
    difference)."""
    grad_xe = torch.zeros_like(xe, memory_format=torch.contiguous_format)
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
    buf = _block_buffer(xe, chunk)
    cuda = xe.device.type == "cuda"
    eps = _eps(weight)
    for c0 in _blocks(weight.shape[0], chunk):
        w_block = weight[c0 : c0 + chunk]
        block = _block_logits(xe, w_block, buf)
        if inv is not None:
            block.mul_(inv[c0 : c0 + chunk])
        if cuda:
            _core.cuda_fused_grad_block_(
                _kernels._mat("block", block), _kernels._vec(labels), c0,
                target_logits.data_ptr(), lse.data_ptr(), scale.data_ptr(),
                stream=torch.cuda.current_stream(xe.device).cuda_stream,
            )
        else:
            _core.fused_grad_block_(
                _np(block), _np(labels), c0, _np(target_logits), _np(lse), _np(scale),
                torch_pool=_kernels.TORCH_OPS,
            )
        gw = grad_w[c0 : c0 + chunk]
        if inv is None:
            grad_xe.addmm_(block, w_block)
            torch.mm(block.t(), xe, out=gw)
            continue
        # Logits (xe . w_j) inv_j: G' = G inv_j gives grad_xe and h_j = G'^T xe; then
        # dL/dw_j = h_j - inv_j^2 <h_j, w_j> w_j where |w_j| > eps (inv_j = 1/|w_j| there;
        # below eps inv_j is the constant 1/eps).
        ib = inv[c0 : c0 + chunk]
        block.mul_(ib)
        grad_xe.addmm_(block, w_block)
        torch.mm(block.t(), xe, out=gw)
        # Row dots <h_j, w_j>: on CPU, vecdot measured about 4x faster than the same dots as a
        # batched bmm of 1 x D by D x 1 products.
        r = torch.linalg.vecdot(gw, w_block)
        coef = torch.where(ib * eps < 1.0, -(ib * ib) * r, torch.zeros_like(r))
        gw.addcmul_(w_block, coef.unsqueeze(1))
    return grad_xe, grad_w


def row_scale(grad_out: Tensor, reduction: str, n: int, dtype: torch.dtype) -> Tensor:
    """dL/d(loss_i) for every row, from the gradient of the reduced loss."""
    if reduction == "none":
        return grad_out.to(dtype).contiguous()
    g = grad_out.to(dtype).reshape(())
    if reduction == "mean":
        g = g / max(n, 1)
    return g.expand(n).contiguous()


def reduce_losses(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.mean() if losses.numel() else losses.sum() * math.nan


def target_grad(target_logits: Tensor, lse: Tensor, scale: Tensor) -> Tensor:
    """dL/d(target logit) = scale * (softmax at the target - 1), for every row."""
    p = torch.exp(target_logits.to(torch.float64) - lse)
    return (scale.to(torch.float64) * (p - 1.0)).to(scale.dtype)


class _FusedMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        target: Tensor,
        margin: Margin,
        lam: float | Tensor,
        reduction: str,
        chunk: int,
        apply_margin: bool,
    ) -> Tensor:
        x, weight = x.contiguous(), weight.contiguous()
        p = prepare(x, weight, target, margin, lam, apply_margin=apply_margin)
        row_max, row_sum = stream_lse(p.xe, weight, p.inv, target, p.target, chunk)
        lse = row_max + torch.log(row_sum)
        losses = (lse - p.target.to(torch.float64)).to(x.dtype)
        ctx.save_for_backward(weight, target, lse)
        ctx.p, ctx.reduction, ctx.chunk = p, reduction, chunk
        return reduce_losses(losses, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        weight, target, lse = ctx.saved_tensors
        p: Prepared = ctx.p
        scale = row_scale(grad_out, ctx.reduction, p.xe.shape[0], p.xe.dtype)
        grad_xe, grad_w = stream_grad(
            p.xe, weight, p.inv, target, p.target, lse, scale, ctx.chunk
        )
        grad_x = p.backward(grad_xe, target_grad(p.target, lse, scale), grad_w)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (grad_x if need_x else None), (grad_w if need_w else None), *([None] * 6)


def _lam_value(lam: float | Tensor, x: Tensor) -> float | Tensor:
    lam = check_lam_arg(lam)
    if isinstance(lam, Tensor):
        # A CUDA lambda for CUDA inputs stays on the device (the margin kernels read it there).
        if lam.device.type == "cuda" and x.device.type == "cuda":
            return lam
        return check_lambda(float(lam.item()))
    return lam


def margin_cross_entropy(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    margin: int | Margin,
    reduction: str = "mean",
    chunk_size: int | None = None,
    *,
    lam: float | Tensor = 0.0,
) -> Tensor:
    """Cross-entropy of the margin logits, streamed over blocks of ``chunk_size`` classes.

    ``margin`` is a ``lsoftmax.margins`` spec (``ArcFace(0.5, 64.0)``, ``CosFace``,
    ``SphereFace``, ``LSoftmax``, ``Combined``...) or an int m, meaning ``LSoftmax(m)``
    (``margin=1`` is plain softmax cross-entropy). Equals
    ``F.cross_entropy(margin_logits(x, weight, target, margin, lam), target,
    reduction=reduction)`` (gradients included) without ever holding an N x C tensor. ``lam``
    is the blending weight of the kinds that use one (lsoftmax, sphereface; a float or a 0-d
    tensor, e.g. a schedule's value). float32/float64 on CPU, and on CUDA with a CUDA build.
    """
    check_inputs(x, weight, target)
    if target is None:
        raise ValueError("target is required: the loss needs a label per row")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64 for the fused loss, got {x.dtype}")
    spec = resolve_margin(margin)
    reduction = check_reduction(reduction)
    chunk = check_chunk_size(chunk_size, x.shape[0], weight.shape[0])
    return _FusedMarginCE.apply(
        x, weight, target, spec, _lam_value(lam, x), reduction, chunk, True
    )


def _plain_cross_entropy(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    margin: Margin,
    reduction: str,
    chunk_size: int | None,
) -> Tensor:
    """Cross-entropy of the kind's plain logits (no margin), streamed the same way."""
    check_inputs(x, weight, target)
    chunk = check_chunk_size(chunk_size, x.shape[0], weight.shape[0])
    return _FusedMarginCE.apply(x, weight, target, margin, 0.0, reduction, chunk, False)


class MarginCrossEntropy(MarginLinear):
    """``MarginLinear`` and cross-entropy in one module, through the fused loss.

    ``margin``: a ``lsoftmax.margins`` spec, or an int m for L-Softmax (``LSoftmax(m)``, the
    default m = 4). ``forward(x, target)`` returns the loss (``x`` 2-D): in training mode with
    the margin (at the schedule's lambda for the kinds that use one; the step counter follows
    ``MarginLinear``'s rule), in eval mode the cross-entropy of the kind's plain logits.
    ``logits(x)`` gives the plain logits for inference. The parameters and buffers are
    ``MarginLinear``'s, so a state_dict loads into ``MarginLinear``, and for an int margin into
    ``LSoftmaxLinear`` too (the exporters take either).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        margin: int | Margin = 4,
        schedule: Any = None,
        *,
        reduction: str = "mean",
        chunk_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_features, out_features, resolve_margin(margin), schedule, device=device,
            dtype=dtype,
        )
        self.reduction = check_reduction(reduction)
        check_chunk_size(chunk_size, 1, out_features)
        self.chunk_size = chunk_size

    def logits(self, x: Tensor) -> Tensor:
        return super().forward(x)

    def forward(self, x: Tensor, target: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if target is None:
            raise ValueError("target is required: MarginCrossEntropy returns the loss")
        if not self.training:
            return _plain_cross_entropy(
                x, self.weight, target, self.margin, self.reduction, self.chunk_size
            )
        # MarginLinear's step rule (grad-enabled forwards, or optimizer steps after attach()).
        lam = self._scheduled_value(True)
        return margin_cross_entropy(
            x, self.weight, target, self.margin, self.reduction, self.chunk_size, lam=lam
        )

    def _state_fields(self) -> dict[str, Any]:
        fields = super()._state_fields()
        if isinstance(self.margin, LSoftmax):
            # LSoftmaxLinear's form (an int), so the state_dict loads into it as well.
            fields["margin"] = int(self.margin.m)
        return fields

    def _load_state_fields(self, fields: dict[str, Any]) -> None:
        m = fields.get("margin")
        if m is not None and not isinstance(m, dict):
            fields = {**fields, "margin": LSoftmax(check_margin(m)).to_dict()}
        super()._load_state_fields(fields)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduction={self.reduction!r}, chunk_size={self.chunk_size}"
