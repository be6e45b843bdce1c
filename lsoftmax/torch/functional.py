"""Functional forms of the margin heads: ``lsoftmax_logits`` (L-Softmax, an int margin) and
``margin_logits`` (any spec of ``lsoftmax.margins``)."""

from __future__ import annotations

import torch
from torch import Tensor

from lsoftmax.margins import Margin
from lsoftmax.torch import ops  # also registers torch.ops.lsoftmax
from lsoftmax.torch.checks import (
    check_inputs,
    check_lam_arg,
    check_lambda,
    check_margin,
    check_target,
)

__all__ = [
    "check_inputs",
    "check_lambda",
    "check_margin",
    "check_target",
    "family_logits",
    "lsoftmax_logits",
    "margin_cross_entropy",
    "margin_logits",
]

def lsoftmax_logits(
    x: Tensor, weight: Tensor, target: Tensor | None, margin: int, lam: float | Tensor = 0.0
) -> Tensor:
    """L-Softmax logits: ``x @ weight.T`` with the margin applied to each row's target logit.

    With ``target=None`` these are the plain logits. ``lam`` is the blending weight (a float, or
    a 0-d tensor when it changes every step, as a schedule's does).
    """
    check_inputs(x, weight, target)
    margin = check_margin(margin)
    lam = check_lam_arg(lam)
    return checked_logits(x, weight, target, margin, lam)


def checked_logits(
    x: Tensor,
    weight: Tensor,
    target: Tensor | None,
    margin: int,
    lam: float | Tensor,
    eager: bool | None = None,
) -> Tensor:
    """``lsoftmax_logits`` for arguments that were already checked.

    Eager calls on CPU tensors run an autograd.Function over the kernels; everything else (CUDA,
    torch.compile, torch.export, the ONNX exporter) goes through the ``lsoftmax::`` custom ops.
    ``eager``: ``ops.eager_cpu`` of these arguments when the caller has it already.
    """
    if eager is None:
        eager = ops.eager_cpu(x, weight, target, lam if isinstance(lam, Tensor) else None)
    if eager:
        if target is None or margin == 1:
            return ops.plain_logits(x, weight)
        return ops.eager_margin_linear(
            x, weight, target, margin, float(lam.item()) if isinstance(lam, Tensor) else lam
        )
    if target is None:
        return torch.ops.lsoftmax.linear(x, weight, None, margin, 0.0)
    if isinstance(lam, Tensor):
        return torch.ops.lsoftmax.margin_linear(x, weight, target, lam.to(torch.float64), margin)
    return torch.ops.lsoftmax.linear(x, weight, target, margin, lam)


def margin_logits(
    x: Tensor,
    weight: Tensor,
    target: Tensor | None,
    margin: Margin,
    lam: float | Tensor = 0.0,
) -> Tensor:
    """Margin logits of any kind of ``lsoftmax.margins`` (``x`` (N, D), ``weight`` (C, D)).

    With a target, each row's target logit gets the margin; with ``target=None`` these are the
    kind's plain logits (``x @ weight.T``, ``|x| cos theta_j`` for SphereFace, ``s cos theta_j``
    for the cosine kinds). ``lam`` is the blending weight of the kinds that use one (L-Softmax,
    SphereFace): a float, or a 0-d tensor (a schedule's value); the others ignore it.
    """
    if not isinstance(margin, Margin):
        raise TypeError(f"margin must be a lsoftmax.margins.Margin, got {margin!r}")
    check_inputs(x, weight, target)
    lam = check_lam_arg(lam)
    return family_logits(x, weight, target, margin, lam)


def family_logits(
    x: Tensor, weight: Tensor, target: Tensor | None, margin: Margin, lam: float | Tensor
) -> Tensor:
    """``margin_logits`` for arguments that were already checked. L-Softmax takes its own ops
    (``lsoftmax::linear``, the eager C++ path); the other kinds ``lsoftmax::margin_family_*``."""
    if margin.kind == "lsoftmax":
        return checked_logits(x, weight, target, int(margin.params()[0]), lam)
    if target is None:
        return torch.ops.lsoftmax.margin_family_linear(
            x, weight, None, 0.0, margin.kind, margin.params()
        )
    if isinstance(lam, Tensor):
        return torch.ops.lsoftmax.margin_family_scheduled(
            x, weight, target, lam.to(torch.float64), margin.kind, margin.params()
        )
    return torch.ops.lsoftmax.margin_family_linear(
        x, weight, target, float(lam), margin.kind, margin.params()
    )


# The fused loss lives in its own module (it builds on the checks above); imported last so that
# either module can be imported first.
from lsoftmax.torch.fused import margin_cross_entropy  # noqa: E402
