"""Functional form of the L-Softmax layer."""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import Tensor

from lsoftmax import _core
from lsoftmax._checks import check_features
from lsoftmax.torch import ops  # also registers torch.ops.lsoftmax

__all__ = [
    "check_inputs",
    "check_lambda",
    "check_margin",
    "check_target",
    "lsoftmax_logits",
    "margin_cross_entropy",
]

_FLOATS = (torch.float32, torch.float64)
_LABELS = (torch.int32, torch.int64)
# The CUDA kernels also take 16-bit inputs (their per-row math runs in float32).
_CUDA_FLOATS = (torch.float16, torch.bfloat16)


def check_margin(margin: object) -> int:
    """``margin`` as an int: the core's rule (an integer, numpy ones too, in [1, 2^20]).

    Plain Python (no call into the extension) so that compiled graphs can trace it; the bound
    is the core's ``max_margin``.
    """
    if isinstance(margin, (bool, np.bool_)) or not hasattr(type(margin), "__index__"):
        raise TypeError(f"margin must be an int, got {type(margin).__name__}")
    value = operator.index(margin)  # type: ignore[arg-type]
    if not 1 <= value <= _core.max_margin:
        raise ValueError(f"margin must be an integer in [1, 2^20], got {value}")
    return value


def check_lambda(lam: object) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"lam must be a float, got {type(lam).__name__}")
    if math.isnan(lam) or lam < 0:
        raise ValueError(f"lam must be >= 0 (and not NaN), got {lam}")
    return float(lam)


def check_inputs(x: Tensor, weight: Tensor, target: Tensor | None) -> None:
    """Shape, dtype and device checks that need no data (they also run under torch.compile)."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS and not (t.device.type == "cuda" and t.dtype in _CUDA_FLOATS):
            raise TypeError(
                f"{name} must be float32 or float64 (or float16/bfloat16 on CUDA), got {t.dtype}"
            )
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x is {x.dtype} but weight is {weight.dtype}; they must match")
    check_features(x.shape[1], "weight", weight.shape[1], "(out_features, in_features)")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    check_target(target, x)


def check_target(target: Tensor | None, x: Tensor) -> None:
    """Checks optional int32/int64 labels: one per row of ``x``, on ``x``'s device."""
    if target is None:
        return
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in _LABELS:
        raise TypeError(f"target must be int32 or int64, got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != x.shape[0]:
        raise ValueError(
            f"target must have shape ({x.shape[0]},) to match x, got {tuple(target.shape)}"
        )
    if target.device != x.device:
        raise ValueError(f"target is on {target.device} but x is on {x.device}")


def lsoftmax_logits(
    x: Tensor, weight: Tensor, target: Tensor | None, margin: int, lam: float | Tensor = 0.0
) -> Tensor:
    """L-Softmax logits: ``x @ weight.T`` with the margin applied to each row's target logit.

    With ``target=None`` these are the plain logits. ``lam`` is the blending weight (a float, or
    a 0-d tensor when it changes every step, as a schedule's does).
    """
    check_inputs(x, weight, target)
    margin = check_margin(margin)
    if isinstance(lam, Tensor):
        if lam.dim() != 0:
            raise ValueError(f"lam must be a float or a 0-d tensor, got shape {tuple(lam.shape)}")
    else:
        lam = check_lambda(lam)
    return checked_logits(x, weight, target, margin, lam)


def checked_logits(
    x: Tensor, weight: Tensor, target: Tensor | None, margin: int, lam: float | Tensor
) -> Tensor:
    """``lsoftmax_logits`` for arguments that were already checked.

    Eager calls on CPU tensors run an autograd.Function over the kernels; everything else (CUDA,
    torch.compile, torch.export, the ONNX exporter) goes through the ``lsoftmax::`` custom ops.
    """
    if ops.eager_cpu(x, weight, target, lam if isinstance(lam, Tensor) else None):
        if target is None or margin == 1:
            return torch.mm(x, weight.t())
        return ops.eager_margin_linear(
            x, weight, target, margin, float(lam.item()) if isinstance(lam, Tensor) else lam
        )
    if target is None:
        return torch.ops.lsoftmax.linear(x, weight, None, margin, 0.0)
    if isinstance(lam, Tensor):
        return torch.ops.lsoftmax.margin_linear(x, weight, target, lam.to(torch.float64), margin)
    return torch.ops.lsoftmax.linear(x, weight, target, margin, lam)


# The fused loss lives in its own module (it builds on the checks above); imported last so that
# either module can be imported first.
from lsoftmax.torch.fused import margin_cross_entropy  # noqa: E402
