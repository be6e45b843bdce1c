"""Argument checks of the torch layers, shared by the functional forms and the custom ops.

Plain Python and data-free, so they also run under torch.compile; the margin rule itself is the
core's (``lsoftmax._core``), reached through ``check_margin``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from lsoftmax import _core
from lsoftmax._checks import check_features

__all__ = ["check_inputs", "check_lam_arg", "check_lambda", "check_margin", "check_target"]

_FLOATS = (torch.float32, torch.float64)
_LABELS = (torch.int32, torch.int64)
# The CUDA kernels also take 16-bit inputs (their per-row math runs in float32).
_CUDA_FLOATS = (torch.float16, torch.bfloat16)


def check_margin(margin: object) -> int:
    """``margin`` as an int after the core's rule (an integer, numpy ones too, in [1, 2^20])."""
    return int(_core.check_margin(margin))


def check_lambda(lam: object) -> float:
    # numbers.Real: numpy's scalars too (np.float32 is no subclass of float).
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
        raise TypeError(f"lam must be a float, got {type(lam).__name__}")
    if math.isnan(lam) or lam < 0:
        raise ValueError(f"lam must be >= 0 (and not NaN), got {lam}")
    return float(lam)


def check_lam_arg(lam: object) -> float | Tensor:
    """``lam`` as the layers take it: a float (``check_lambda``), or a 0-d tensor (a schedule's
    value), returned as it is."""
    if isinstance(lam, Tensor):
        if lam.dim() != 0:
            raise ValueError(f"lam must be a float or a 0-d tensor, got shape {tuple(lam.shape)}")
        return lam
    return check_lambda(lam)


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
