"""Fused margin cross-entropy: the loss of the L-Softmax margin logits without the N x C logits.

``margin_cross_entropy(x, weight, target, margin, lam=...)`` equals
``F.cross_entropy(lsoftmax_logits(x, weight, target, margin, lam), target)`` but streams over
blocks of classes: each block's logits ``x @ W_block.T`` (an N x B GEMM by torch) are folded into
a per-row online log-sum-exp by the core (``fused_lse_block``) and dropped. The backward
recomputes each block and has the core turn it into ``scale * (softmax - onehot)``
(``fused_grad_block``) before the block's two gradient GEMMs. Memory beyond the inputs and
``grad_weight``: one N x B block, ``grad_x`` and a few N-vectors.

Why recompute rather than compute the gradient in the forward: the gradient needs each row's
final log-sum-exp, which is known only after the last block, so a one-pass gradient would have
to keep every block (N x C) or rescale ``grad_weight`` per row and class; the two-pass variant
(log-sum-exp pass, then a gradient pass inside the forward) does the same four GEMMs as
recomputing in the backward, and would also keep a C x D gradient alive between forward and
backward. Recomputing costs one extra N x B x D GEMM per block (4 GEMMs against the unfused
path's 3) and saves the N x C passes and allocations (see docs/huge.md for the measurements).

The margin itself is the ordinary layer's: the target logits are ``<x_i, w_{y_i}>`` rewritten by
``margin_forward`` and their gradient terms added by ``margin_backward``, both run on an N x C
*view with column stride 0* over N values (the kernels only touch entry ``(i, y_i)``), so the
margin math has one home. A later margin kind only needs to supply those two steps
(``_TargetMargin``); the streaming part is margin-agnostic.

The pieces (``margin_targets``, ``stream_lse``, ``stream_grad``) are public to this package so
that the class-sharded head (``lsoftmax.torch.distributed``) runs the same kernels on its shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lsoftmax import _core
from lsoftmax.torch import _kernels
from lsoftmax.torch.functional import check_inputs, check_lambda, check_margin
from lsoftmax.torch.modules import LSoftmaxLinear

__all__ = [
    "MarginCrossEntropy",
    "default_chunk_size",
    "margin_cross_entropy",
    "margin_targets",
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


# --- target margin (the only margin-specific step) ---------------------------------------------


@dataclass
class _TargetMargin:
    """The target logits of the rows a weight (or shard) owns, and what their backward needs."""

    rows: Tensor | None  # indices of the owned rows, None = all rows
    labels: Tensor  # labels of the owned rows, relative to the weight's first class
    logits: Tensor  # (N,) target logit of every row (0 for rows not owned)
    stats: dict[str, Any] | None


def _stride0(v: Tensor, cols: int) -> Tensor:
    # An (n, cols) view whose every column is v: the layer's kernels read and write only the
    # entry (i, y_i), so this hands them the n target values without an n x cols tensor.
    return v.as_strided((v.shape[0], cols), (1, 0))


def margin_targets(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    margin: int,
    lam: float | Tensor,
    rows: Tensor | None = None,
) -> _TargetMargin:
    """Margin target logits of the rows ``rows`` (all when None), ``labels`` relative to ``weight``.

    The labels of the owned rows are checked against ``[0, weight.shape[0])`` by the core.
    """
    xs = x if rows is None else x.index_select(0, rows)
    ys = labels if rows is None else labels.index_select(0, rows)
    if ys.numel() and ys.device.type == "cpu":
        # Check before indexing weight with them (the core would name the same row).
        bad = (ys < 0) | (ys >= weight.shape[0])
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"labels[{i}] = {int(ys[i])} is out of range [0, {weight.shape[0]})"
            )
    f = torch.bmm(xs.unsqueeze(1), weight.index_select(0, ys).unsqueeze(2)).view(-1)
    # Row stats (saved for the backward) come only from the numpy route, whose loops run on the
    # core's own pool; with the libtorch extension the backward recomputes them (N rows) and
    # every loop runs on torch's pool.
    stats = _kernels.margin_forward_(
        _stride0(f, weight.shape[0]), xs, weight, ys, margin, lam,
        xs.device.type == "cpu" and not _kernels.TORCH_OPS,
    )
    if rows is None:
        logits = f
    else:
        logits = x.new_zeros(x.shape[0])
        logits.index_copy_(0, rows, f)
    return _TargetMargin(rows, ys, logits, stats)


def add_margin_grad(
    tm: _TargetMargin,
    target_grad: Tensor,
    x: Tensor,
    weight: Tensor,
    grad_x: Tensor,
    grad_weight: Tensor,
    margin: int,
    lam: float | Tensor,
) -> None:
    """Adds the margin terms for ``target_grad`` (dL/d target logit, (N,)) to the gradients."""
    if tm.rows is None:
        xs, gx, g = x, grad_x, target_grad
    else:
        xs, g = x.index_select(0, tm.rows), target_grad.index_select(0, tm.rows)
        gx = torch.zeros_like(xs)
    _kernels.margin_backward_(
        _stride0(g.contiguous(), weight.shape[0]), xs, weight, tm.labels, gx, grad_weight,
        margin, lam, tm.stats,
    )
    if tm.rows is not None:
        grad_x.index_add_(0, tm.rows, gx)


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
    x: Tensor, weight: Tensor, labels: Tensor, target_logits: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """Per-row (max, sum of exp(v - max)) over the classes of ``weight``, float64.

    ``v`` is ``x @ weight.T`` with entry ``(i, labels[i])`` replaced by ``target_logits[i]``
    where ``labels[i]`` is in range (other rows have no target here).
    """
    n = x.shape[0]
    row_max = torch.full((n,), -math.inf, dtype=torch.float64, device=x.device)
    row_sum = torch.zeros(n, dtype=torch.float64, device=x.device)
    buf = _block_buffer(x, chunk)
    cuda = x.device.type == "cuda"
    for c0 in _blocks(weight.shape[0], chunk):
        block = _block_logits(x, weight[c0 : c0 + chunk], buf)
        if cuda:
            _core.cuda_fused_lse_block_(
                _kernels._mat("block", block), _kernels._vec(labels), c0,
                target_logits.data_ptr(), row_max.data_ptr(), row_sum.data_ptr(),
                stream=torch.cuda.current_stream(x.device).cuda_stream,
            )
        else:
            _core.fused_lse_block_(
                _np(block), _np(labels), c0, _np(target_logits), _np(row_max), _np(row_sum),
                torch_pool=_kernels.TORCH_OPS,
            )
    return row_max, row_sum


def stream_grad(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    target_logits: Tensor,
    lse: Tensor,
    scale: Tensor,
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_weight) of ``sum_i scale_i * CE_i`` through the plain logits.

    The target entries carry dL/d(target logit); the margin's own terms come from
    ``add_margin_grad``.
    """
    grad_x = torch.zeros_like(x, memory_format=torch.contiguous_format)
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
    buf = _block_buffer(x, chunk)
    cuda = x.device.type == "cuda"
    for c0 in _blocks(weight.shape[0], chunk):
        w_block = weight[c0 : c0 + chunk]
        block = _block_logits(x, w_block, buf)
        if cuda:
            _core.cuda_fused_grad_block_(
                _kernels._mat("block", block), _kernels._vec(labels), c0,
                target_logits.data_ptr(), lse.data_ptr(), scale.data_ptr(),
                stream=torch.cuda.current_stream(x.device).cuda_stream,
            )
        else:
            _core.fused_grad_block_(
                _np(block), _np(labels), c0, _np(target_logits), _np(lse), _np(scale),
                torch_pool=_kernels.TORCH_OPS,
            )
        grad_x.addmm_(block, w_block)
        torch.mm(block.t(), x, out=grad_w[c0 : c0 + chunk])
    return grad_x, grad_w


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
        margin: int,
        lam: float | Tensor,
        reduction: str,
        chunk: int,
    ) -> Tensor:
        x, weight = x.contiguous(), weight.contiguous()
        tm = margin_targets(x, weight, target, margin, lam)
        row_max, row_sum = stream_lse(x, weight, target, tm.logits, chunk)
        lse = row_max + torch.log(row_sum)
        losses = (lse - tm.logits.to(torch.float64)).to(x.dtype)
        ctx.save_for_backward(x, weight, target, lse)
        ctx.tm, ctx.margin, ctx.lam, ctx.reduction, ctx.chunk = tm, margin, lam, reduction, chunk
        return reduce_losses(losses, reduction)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, weight, target, lse = ctx.saved_tensors
        tm: _TargetMargin = ctx.tm
        scale = row_scale(grad_out, ctx.reduction, x.shape[0], x.dtype)
        grad_x, grad_w = stream_grad(x, weight, target, tm.logits, lse, scale, ctx.chunk)
        add_margin_grad(
            tm, target_grad(tm.logits, lse, scale), x, weight, grad_x, grad_w, ctx.margin,
            ctx.lam,
        )
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return (grad_x if need_x else None), (grad_w if need_w else None), *([None] * 5)


def _lam_value(lam: float | Tensor, x: Tensor) -> float | Tensor:
    if isinstance(lam, Tensor):
        if lam.dim() != 0:
            raise ValueError(f"lam must be a float or a 0-d tensor, got shape {tuple(lam.shape)}")
        # A CUDA lambda for CUDA inputs stays on the device (the margin kernels read it there).
        if lam.device.type == "cuda" and x.device.type == "cuda":
            return lam
        return check_lambda(float(lam.item()))
    return check_lambda(lam)


def margin_cross_entropy(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    margin: int,
    reduction: str = "mean",
    chunk_size: int | None = None,
    *,
    lam: float | Tensor = 0.0,
) -> Tensor:
    """Cross-entropy of the L-Softmax margin logits, streamed over blocks of ``chunk_size`` classes.

    Equals ``F.cross_entropy(lsoftmax_logits(x, weight, target, margin, lam), target,
    reduction=reduction)`` (gradients included) without ever holding an N x C tensor. ``lam``
    is the blending weight (a float or a 0-d tensor, e.g. a schedule's value); ``margin=1`` is
    plain softmax cross-entropy. float32/float64 on CPU, and on CUDA with a CUDA build.
    """
    check_inputs(x, weight, target)
    if target is None:
        raise ValueError("target is required: the loss needs a label per row")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64 for the fused loss, got {x.dtype}")
    margin = check_margin(margin)
    reduction = check_reduction(reduction)
    chunk = check_chunk_size(chunk_size, x.shape[0], weight.shape[0])
    out = _FusedMarginCE.apply(
        x, weight, target, margin, _lam_value(lam, x), reduction, chunk
    )
    return out


class MarginCrossEntropy(LSoftmaxLinear):
    """``LSoftmaxLinear`` and cross-entropy in one module, through the fused loss.

    ``forward(x, target)`` returns the loss (``x`` 2-D): in training mode with the margin at the
    schedule's lambda (the step counter follows ``LSoftmaxLinear``'s rule), in eval mode plain
    softmax cross-entropy. ``logits(x)`` gives the plain logits for inference. The parameters
    and buffers are ``LSoftmaxLinear``'s, so a state_dict loads into either module (and the
    exporters take the ``LSoftmaxLinear``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        margin: int = 4,
        schedule: Any = None,
        *,
        reduction: str = "mean",
        chunk_size: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, margin, schedule, device=device, dtype=dtype)
        self.reduction = check_reduction(reduction)
        check_chunk_size(chunk_size, 1, out_features)
        self.chunk_size = chunk_size

    def logits(self, x: Tensor) -> Tensor:
        return super().forward(x)

    def forward(self, x: Tensor, target: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if target is None:
            raise ValueError("target is required: MarginCrossEntropy returns the loss")
        if not self.training:
            return margin_cross_entropy(
                x, self.weight, target, 1, self.reduction, self.chunk_size
            )
        # LSoftmaxLinear's step rule (grad-enabled forwards, or optimizer steps after attach()).
        lam = self._scheduled_value(True)
        return margin_cross_entropy(
            x, self.weight, target, self.margin, self.reduction, self.chunk_size, lam=lam
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduction={self.reduction!r}, chunk_size={self.chunk_size}"
