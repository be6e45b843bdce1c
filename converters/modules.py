"""Torch layers for source-layer semantics that ``torch.nn`` has no exact module for.

Each keeps the source's numerics at inference and exports to ONNX with standard operators.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BatchNorm",
    "CaffeTransform",
    "ChannelScale",
    "Concat",
    "Eltwise",
    "GlobalPool",
    "InnerProduct",
    "InvStdBatchNorm",
]


def _channel_view(t: Tensor, x: Tensor, axis: int = 1) -> Tensor:
    """``t`` (shape of x's dims axis..axis+t.dim()) reshaped to broadcast against ``x``."""
    return t.reshape(*t.shape, *([1] * (x.dim() - axis - t.dim())))


class InnerProduct(nn.Linear):
    """``nn.Linear`` on the input flattened from ``axis`` on (Caffe InnerProduct, MXNet FC)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, axis: int = 1) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.axis = axis

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(torch.flatten(x, self.axis))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, axis={self.axis}"


class BatchNorm(nn.Module):
    """Batch norm over axis 1 of an input of any rank >= 2 (Caffe BatchNorm, MXNet BatchNorm).

    ``affine=False`` is Caffe's layer (its affine part is a separate ``Scale``). Eval mode, or
    ``use_global_stats``, normalizes with the running statistics; training mode uses batch
    statistics and updates the running ones with ``momentum`` (torch's convention: the weight of
    the new batch).
    """

    running_mean: Tensor
    running_var: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float,
        momentum: float,
        affine: bool,
        use_global_stats: bool = False,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.use_global_stats = bool(use_global_stats)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.weight: nn.Parameter | None = None
        self.bias: nn.Parameter | None = None
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=self.training and not self.use_global_stats,
            momentum=self.momentum,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.weight is not None}, use_global_stats={self.use_global_stats}"
        )


class InvStdBatchNorm(nn.Module):
    """The L-Softmax Caffe fork's ``BN`` layer, which keeps the running *inverse* std.

    Eval: ``(x - running_mean) * running_inv_std * weight + bias`` (the fork's test-time
    formula, kept as is so the stored statistics are used without conversion). Training
    (unless ``frozen``): batch statistics, and the running ones move as the fork moves them,
    ``new = (1 - momentum) * batch + momentum * old``, with the batch's ``1/sqrt(var + eps)``.
    """

    running_mean: Tensor
    running_inv_std: Tensor

    def __init__(self, num_features: int, eps: float, momentum: float, frozen: bool) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.frozen = bool(frozen)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_inv_std", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and not self.frozen:
            dims = [d for d in range(x.dim()) if d != 1]
            mean = x.mean(dim=dims)
            var = x.var(dim=dims, unbiased=False)
            inv_std = torch.rsqrt(var + self.eps)
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(m).add_((1.0 - m) * mean.detach())
                self.running_inv_std.mul_(m).add_((1.0 - m) * inv_std.detach())
        else:
            mean, inv_std = self.running_mean, self.running_inv_std
        scale = _channel_view(inv_std * self.weight, x)
        return (x - _channel_view(mean, x)) * scale + _channel_view(self.bias, x)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, frozen={self.frozen}"
        )


class ChannelScale(nn.Module):
    """Caffe ``Scale`` with a learned scale: ``x * weight (+ bias)`` along ``axis``."""

    def __init__(self, shape: tuple[int, ...], bias: bool, axis: int = 1) -> None:
        super().__init__()
        self.axis = axis
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = x * _channel_view(self.weight, x, self.axis)
        if self.bias is not None:
            y = y + _channel_view(self.bias, x, self.axis)
        return y

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}, bias={self.bias is not None}, axis={self.axis}"


class CaffeTransform(nn.Module):
    """Caffe's ``transform_param`` as the TEST phase applies it to a data layer's images:
    a centre crop to ``crop_size`` (0: none), then ``(x - mean) * scale``, where ``mean`` is
    per channel (``mean_value``: one value, or one per channel) or a (C, H, W) mean image
    (``mean_file``, cropped with the image)."""

    mean: Tensor | None

    def __init__(self, mean: Tensor | None, scale: float, crop_size: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.scale = float(scale)
        self.crop_size = int(crop_size)

    def _crop(self, t: Tensor) -> Tensor:
        c = self.crop_size
        h, w = t.shape[-2], t.shape[-1]
        if h < c or w < c:
            raise ValueError(f"crop_size {c} is larger than the input's {h}x{w} images")
        top, left = (h - c) // 2, (w - c) // 2  # Caffe's TEST-phase offsets
        return t[..., top : top + c, left : left + c]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError(f"expected (N, C, ...) images, got shape {tuple(x.shape)}")
        if self.crop_size:
            x = self._crop(x)
        if self.mean is not None:
            mean = self.mean
            if mean.dim() == 3 and self.crop_size:
                mean = self._crop(mean)
            if mean.dim() == 1 and mean.numel() > 1 and mean.numel() != x.shape[1]:
                raise ValueError(
                    f"transform_param has {mean.numel()} mean values but the input has "
                    f"{x.shape[1]} channels"
                )
            x = x - (_channel_view(mean, x) if mean.dim() == 1 else mean)
        if self.scale != 1.0:
            x = x * self.scale
        return x

    def extra_repr(self) -> str:
        mean = None if self.mean is None else list(self.mean.shape)
        return f"mean={mean}, scale={self.scale:g}, crop_size={self.crop_size}"


class GlobalPool(nn.Module):
    """Pooling over all spatial positions (Caffe ``global_pooling``, MXNet ``global_pool``)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in ("max", "avg", "sum"):
            raise ValueError(f"GlobalPool mode must be max, avg or sum, got {mode!r}")
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        dims = tuple(range(2, x.dim()))
        if self.mode == "max":
            return x.amax(dim=dims, keepdim=True)
        if self.mode == "sum":
            return x.sum(dim=dims, keepdim=True)
        return x.mean(dim=dims, keepdim=True)

    def extra_repr(self) -> str:
        return self.mode


class Eltwise(nn.Module):
    """Element-wise combination of several inputs (Caffe ``Eltwise``, MXNet ``elemwise_add``):
    ``sum`` (with per-input coefficients), ``prod`` or ``max``."""

    def __init__(self, op: str, coeffs: tuple[float, ...] | None = None) -> None:
        super().__init__()
        if op not in ("sum", "prod", "max"):
            raise ValueError(f"Eltwise op must be sum, prod or max, got {op!r}")
        self.op = op
        self.coeffs = tuple(float(c) for c in coeffs) if coeffs else None

    def forward(self, *xs: Tensor) -> Tensor:
        if self.op == "sum":
            if self.coeffs is None:
                out = xs[0]
                for x in xs[1:]:
                    out = out + x
                return out
            out = xs[0] * self.coeffs[0]
            for c, x in zip(self.coeffs[1:], xs[1:], strict=True):
                out = out + x * c
            return out
        out = xs[0]
        for x in xs[1:]:
            out = out * x if self.op == "prod" else torch.maximum(out, x)
        return out

    def extra_repr(self) -> str:
        return self.op if self.coeffs is None else f"{self.op}, coeffs={self.coeffs}"


class Concat(nn.Module):
    """Concatenation along ``axis`` (Caffe ``Concat``, MXNet ``Concat``)."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, *xs: Tensor) -> Tensor:
        return torch.cat(xs, dim=self.axis)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"
