"""L-GM input checks and helpers: the functional layer of ``lsoftmax.torch.lgm``.

``check_lgm_inputs`` needs no data, so it also runs under ``torch.compile``; the data checks
(labels in range, finite log-variances) are the core's, made where the kernels run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lsoftmax import _core
from lsoftmax._checks import check_features
from lsoftmax.torch.functional import check_target

__all__ = ["check_lgm_inputs", "log_var_from_variances"]

_FLOATS = (torch.float32, torch.float64)


def check_lgm_inputs(x: Tensor, means: Tensor, log_var: Tensor, target: Tensor | None) -> None:
    """Shape, dtype and device checks that need no data (they also run under torch.compile)."""
    for name, t in (("x", x), ("means", means), ("log_var", log_var)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but x is {x.dtype}; they must match")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    check_features(x.shape[1], "means", means.shape[1], "(num_classes, feat_dim)")
    if log_var.shape[0] != means.shape[0] or log_var.shape[1] not in (means.shape[1], 1):
        raise ValueError(
            f"log_var has shape {tuple(log_var.shape)} but means has {tuple(means.shape)}; "
            "log_var must be (C, D) or (C, 1)"
        )
    check_target(target, x)


def log_var_from_variances(variances: Tensor) -> Tensor:
    """``log(variances)``, after the core checks every variance is finite and > 0."""
    if not isinstance(variances, Tensor) or variances.dtype not in _FLOATS:
        raise TypeError("variances must be a float32 or float64 torch.Tensor")
    if variances.dim() != 2:
        raise ValueError(f"variances must be 2-D, got shape {tuple(variances.shape)}")
    out = _core.lgm_log_var_from_variances(variances.cpu().detach().numpy())
    return torch.from_numpy(out).to(variances.device)
