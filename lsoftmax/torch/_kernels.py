"""Device dispatch from torch tensors to the core's per-row kernels (in place).

The CPU path hands numpy views (no copies) to ``lsoftmax._core``.
"""

from __future__ import annotations

import torch

from lsoftmax import _core


def _np(t: torch.Tensor):
    return t.detach().numpy()


def _unsupported(t: torch.Tensor) -> None:
    raise NotImplementedError(
        f"lsoftmax has no kernel for tensors on device {t.device}; "
        "move them to the CPU (or build with CUDA for cuda tensors)"
    )


def margin_forward_(
    logits: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    margin: int,
    lam: float,
) -> None:
    """``logits`` holds ``x @ weight.T``; rewrites the target logit of every row."""
    if logits.device.type == "cpu":
        _core.margin_forward_(_np(logits), _np(x), _np(weight), _np(labels), margin, lam)
    else:
        _unsupported(logits)


def margin_backward_(
    grad_logits: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    grad_x: torch.Tensor,
    grad_weight: torch.Tensor,
    margin: int,
    lam: float,
) -> None:
    """``grad_x``/``grad_weight`` hold the plain GEMM gradients; adds the margin terms."""
    if grad_logits.device.type == "cpu":
        _core.margin_backward_(
            _np(grad_logits),
            _np(x),
            _np(weight),
            _np(labels),
            _np(grad_x),
            _np(grad_weight),
            margin,
            lam,
        )
    else:
        _unsupported(grad_logits)
