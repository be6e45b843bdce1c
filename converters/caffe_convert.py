"""Caffe (BVLC, the L-Softmax, SphereFace and L-GM forks) -> ``ConvertedNet``.

The prototxt gives the graph (filtered by phase), the caffemodel the weights, matched by layer
name (the caffemodel is a snapshot of the TRAIN net, so TEST-only layers find their weights
through shared ``param { name }`` instead). Every mismatch is a ``ValueError`` naming the file
and the layer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import torch
from lsoftmax.converters.caffe_reader import (
    CaffeBlob,
    CaffeLayer,
    CaffeNet,
    parse_blob,
    read_caffemodel,
    read_prototxt,
)
from lsoftmax.converters.graph import ConvertedNet, GraphBuilder, MappingRow, param_shapes
from lsoftmax.converters.limits import (
    MAX_ACTIVATION_ELEMENTS,
    MAX_MODEL_ELEMENTS,
    MAX_TENSOR_ELEMENTS,
    check_elements,
)
from lsoftmax.converters.modules import (
    BatchNorm,
    CaffeTransform,
    ChannelScale,
    Concat,
    Eltwise,
    GlobalPool,
    InnerProduct,
    InvStdBatchNorm,
)
from torch import nn

__all__ = ["SUPPORTED_TYPES", "from_caffe", "unsupported_layer"]

DATA_TYPES = ("Data", "HDF5Data", "ImageData", "MemoryData", "WindowData", "DummyData", "Input")
# The data layers that run Caffe's DataTransformer on what they read (transform_param).
TRANSFORMED_TYPES = ("Data", "ImageData", "MemoryData", "WindowData")
DROPPED_TYPES = (
    "SoftmaxWithLoss",
    "Accuracy",
    "Silence",
    "EuclideanLoss",
    "HingeLoss",
    "InfogainLoss",
    "MultinomialLogisticLoss",
    "SigmoidCrossEntropyLoss",
    "ContrastiveLoss",
    "HDF5Output",
)
PHASES = {"train": 0, "test": 1}
# Caffe's ClassDistance variance floors (see docs/converters.md): isotropic sigma is used as
# max(sigma, 0) + 1e-4, a diagonal one as max(sigma, 1e-8).
ISO_SIGMA_OFFSET = 1e-4
DIAG_SIGMA_FLOOR = 1e-8


def _fail(path: str, layer: CaffeLayer, msg: str) -> NoReturn:
    raise ValueError(f"{path}: layer {layer.name!r} ({layer.type}): {msg}")


def _meets(rule: Any, phase: int) -> bool:
    # Caffe's Net::StateMeetsRule with the state (phase, level 0, no stages).
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and rule.min_level > 0:
        return False
    if rule.HasField("max_level") and rule.max_level < 0:
        return False
    return len(rule.stage) == 0


def _included(layer: CaffeLayer, phase: int) -> bool:
    if layer.include:
        return any(_meets(r, phase) for r in layer.include)
    return not any(_meets(r, phase) for r in layer.exclude)


def _pair(layer: CaffeLayer, p: Any, name: str, default: int | None, path: str) -> tuple[int, int]:
    """Caffe's conv/pool geometry fields (``name_h``/``name_w`` win over ``name``); kernel and
    stride sizes must be positive."""
    h, w = _pair_raw(layer, p, name, default, path)
    if name != "pad" and (h < 1 or w < 1):
        _fail(path, layer, f"{name} must be positive, got {(h, w)}")
    return h, w


def _pair_raw(
    layer: CaffeLayer, p: Any, name: str, default: int | None, path: str
) -> tuple[int, int]:
    h, w = f"{name}_h", f"{name}_w"
    if p.HasField(h) or p.HasField(w):
        # Caffe's ConvolutionLayer takes pad_h or pad_w alone (the other stays 0); everything
        # else (pooling, kernel and stride sizes) needs both.
        lone_ok = name == "pad" and not isinstance(getattr(p, name), int)
        if not lone_ok and not (p.HasField(h) and p.HasField(w)):
            _fail(path, layer, f"{h} and {w} must be given together")
        return int(getattr(p, h)), int(getattr(p, w))
    v = getattr(p, name if name != "kernel" else "kernel_size")
    if isinstance(v, int):  # PoolingParameter: scalar fields
        if name == "kernel" and not p.HasField("kernel_size"):
            _fail(path, layer, "no kernel_size (or kernel_h/kernel_w)")
        if name != "kernel" and not p.HasField(name):
            if default is None:
                _fail(path, layer, f"no {name}")
            return default, default
        return int(v), int(v)
    vals = [int(x) for x in v]
    if not vals:
        if default is None:
            _fail(path, layer, f"no {name if name != 'kernel' else 'kernel_size'}")
        return default, default
    if len(vals) == 1:
        return vals[0], vals[0]
    if len(vals) == 2:
        return vals[0], vals[1]
    _fail(path, layer, f"{len(vals)} values for {name}: only 2-D layers are supported")


@dataclass
class _Converter:
    proto: CaffeNet
    weights: CaffeNet | None
    phase: int
    builder: GraphBuilder = field(default_factory=GraphBuilder)
    shapes: dict[str, tuple[int, ...] | None] = field(default_factory=dict)
    by_name: dict[str, CaffeLayer] = field(default_factory=dict)
    by_param: dict[str, CaffeBlob] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    budgeted: int = 0  # parameter elements of the layers built so far

    def __post_init__(self) -> None:
        if self.weights is not None:
            for layer in self.weights.layers:
                if layer.blobs and layer.name not in self.by_name:
                    self.by_name[layer.name] = layer
                for pname, blob in zip(layer.param_names, layer.blobs, strict=False):
                    if pname:
                        self.by_param.setdefault(pname, blob)

    @property
    def path(self) -> str:
        return self.proto.path

    # ---- weights -------------------------------------------------------------------------

    def blobs(self, layer: CaffeLayer, needed: int, optional: int = 0) -> list[CaffeBlob] | None:
        """The caffemodel's blobs for ``layer`` (None without a caffemodel)."""
        if self.weights is None:
            return None
        self.used.add(layer.name)
        wpath = self.weights.path
        src = self.by_name.get(layer.name)
        if src is not None:
            if src.type != layer.type:
                raise ValueError(
                    f"{wpath}: layer {layer.name!r} is a {src.type} in the caffemodel but a "
                    f"{layer.type} in {self.path}"
                )
            found: list[CaffeBlob] = list(src.blobs)
        else:
            found = []
            for pname in layer.param_names:
                blob = self.by_param.get(pname) if pname else None
                if not isinstance(blob, CaffeBlob):
                    break
                found.append(blob)
        if not found:
            raise ValueError(
                f"{wpath}: no weights for layer {layer.name!r} ({layer.type}) of {self.path}"
            )
        for i, blob in enumerate(found):
            if blob.data.size == 0:
                raise ValueError(
                    f"{wpath}: layer {layer.name!r} ({layer.type}) blob {i} is empty "
                    f"(shape {list(blob.data.shape)})"
                )
        if not needed <= len(found) <= needed + optional:
            want = f"{needed}" if not optional else f"{needed} to {needed + optional}"
            raise ValueError(
                f"{wpath}: layer {layer.name!r} ({layer.type}) has {len(found)} blobs, "
                f"expected {want}"
            )
        return found

    def take(
        self, layer: CaffeLayer, blob: CaffeBlob, index: int, expected: tuple[int, ...]
    ) -> torch.Tensor:
        assert self.weights is not None
        if not blob.matches(expected):
            raise ValueError(
                f"{self.weights.path}: layer {layer.name!r} ({layer.type}) blob {index} has "
                f"shape {list(blob.data.shape)}, but {self.path} implies {list(expected)}"
            )
        return torch.from_numpy(np.ascontiguousarray(blob.data.reshape(expected), np.float32))

    def take_count(
        self, layer: CaffeLayer, blob: CaffeBlob, index: int, count: int
    ) -> torch.Tensor:
        """A per-channel blob stored in any shape with ``count`` elements, as (count,)."""
        assert self.weights is not None
        if blob.data.size != count:
            raise ValueError(
                f"{self.weights.path}: layer {layer.name!r} ({layer.type}) blob {index} has "
                f"{blob.data.size} values (shape {list(blob.data.shape)}), expected {count}"
            )
        return torch.from_numpy(np.ascontiguousarray(blob.data.reshape(count), np.float32))

    def budget(
        self,
        layer: CaffeLayer,
        shapes: list[tuple[int, ...]],
        blobs: list[CaffeBlob] | None = None,
        blob_shapes: list[tuple[int, ...]] | None = None,
    ) -> None:
        """Before a layer's parameters of ``shapes`` are allocated: the caffemodel's blobs fit
        them (``blob_shapes``, default ``shapes``) and the sizes are within the resource
        policy (converters/limits.py)."""
        where = f"{self.path}: layer {layer.name!r} ({layer.type})"
        if blobs is not None:
            assert self.weights is not None
            for i, (blob, want) in enumerate(zip(blobs, blob_shapes or shapes, strict=False)):
                if not blob.matches(want):
                    raise ValueError(
                        f"{self.weights.path}: layer {layer.name!r} ({layer.type}) blob {i} has "
                        f"shape {list(blob.data.shape)}, but {self.path} implies {list(want)}"
                    )
        total = sum(check_elements(where, "parameter", sh, MAX_TENSOR_ELEMENTS) for sh in shapes)
        self.budgeted += total
        if self.budgeted > MAX_MODEL_ELEMENTS:
            raise ValueError(
                f"{where}: the model's parameters reach {self.budgeted} elements, more than the "
                f"{MAX_MODEL_ELEMENTS} the converters accept (docs/reliability.md)"
            )

    # ---- shapes --------------------------------------------------------------------------

    def bottom_shape(self, layer: CaffeLayer, i: int = 0) -> tuple[int, ...] | None:
        return self.shapes.get(layer.bottoms[i]) if i < len(layer.bottoms) else None

    def channels(self, layer: CaffeLayer, blobs: list[CaffeBlob] | None, blob_i: int = 0) -> int:
        shape = self.bottom_shape(layer)
        if shape is not None:
            if len(shape) < 2:
                _fail(self.path, layer, f"input {layer.bottoms[0]!r} has shape {list(shape)}")
            return shape[1]
        if blobs is not None:
            return int(blobs[blob_i].data.size)
        _fail(self.path, layer, "cannot tell the channel count: give input_shape")

    def inner_size(
        self,
        layer: CaffeLayer,
        shape: tuple[int, ...] | None,
        axis: int,
        blobs: list[CaffeBlob] | None,
        n: int,
    ) -> int:
        """Input size K of an inner-product-like layer: from the bottom's shape, else the weight."""
        if shape is not None:
            return math.prod(shape[axis:])
        if blobs is not None:
            return int(blobs[0].data.size) // n
        _fail(self.path, layer, "cannot tell the input size: give input_shape")

    def check_bottoms(self, layer: CaffeLayer, n: int) -> None:
        if len(layer.bottoms) < n:
            _fail(self.path, layer, f"needs {n} bottom(s), has {len(layer.bottoms)}")
        for b in layer.bottoms[:n]:
            if not self.builder.has(b):
                _fail(self.path, layer, f"reads blob {b!r}, which no earlier layer produces")
        if not layer.tops:
            _fail(self.path, layer, "has no top")

    def add(
        self, layer: CaffeLayer, module: nn.Module, note: str = "", n_inputs: int = 1, **kw: Any
    ) -> None:
        self.check_bottoms(layer, n_inputs)
        bottoms = layer.bottoms[:n_inputs]
        in_shapes = [self.shapes.get(b) for b in bottoms]
        self.builder.add(layer.name, module, bottoms, layer.tops[0], **kw)
        out_shape: tuple[int, ...] | None = None
        if all(s is not None for s in in_shapes) and kw.get("kind", "plain") == "plain":
            for b, s in zip(bottoms, in_shapes, strict=True):
                assert s is not None
                check_elements(
                    f"{self.path}: layer {layer.name!r} ({layer.type})",
                    f"input {b!r} (one sample)",
                    (1, *s[1:]),
                    MAX_ACTIVATION_ELEMENTS,
                )
            module.eval()
            try:
                with torch.no_grad():
                    zeros = [torch.zeros((1, *s[1:])) for s in in_shapes if s is not None]
                    out_shape = tuple(module(*zeros).shape)
            except (RuntimeError, ValueError, IndexError) as e:
                _fail(self.path, layer, f"does not fit its input shapes {in_shapes}: {e}")
            first = in_shapes[0]
            assert first is not None
            out_shape = (first[0], *out_shape[1:])
        self.shapes[layer.tops[0]] = out_shape
        self.builder.mapping.append(
            MappingRow(layer.name, layer.type, type(module).__name__, param_shapes(module), note)
        )

    # ---- layers --------------------------------------------------------------------------

    def convolution(self, layer: CaffeLayer) -> None:
        p = layer.param("convolution_param")
        if p.axis != 1:
            _fail(self.path, layer, f"axis {p.axis} is not supported (only 1)")
        kh, kw = _pair(layer, p, "kernel", None, self.path)
        ph, pw = _pair(layer, p, "pad", 0, self.path)
        sh, sw = _pair(layer, p, "stride", 1, self.path)
        dil = [int(x) for x in p.dilation] or [1]
        if min(dil) < 1 or len(dil) > 2:
            _fail(self.path, layer, f"dilation {dil} must be one or two positive values")
        dh, dw = (dil[0], dil[0]) if len(dil) == 1 else (dil[0], dil[1])
        group, cout, bias = int(p.group), int(p.num_output), bool(p.bias_term)
        if cout < 1 or group < 1 or cout % group:
            _fail(self.path, layer, f"num_output {cout} must be a positive multiple of group")
        blobs = self.blobs(layer, 1 + bias)
        shape = self.bottom_shape(layer)
        if shape is not None:
            cin = shape[1]
        elif blobs is not None and blobs[0].data.ndim == 4:
            cin = int(blobs[0].data.shape[1]) * group
        else:
            _fail(self.path, layer, "cannot tell the input channels: give input_shape")
        if cin % group:
            _fail(self.path, layer, f"{cin} input channels are not divisible by group {group}")
        self.budget(layer, [(cout, cin // group, kh, kw), *([(cout,)] if bias else [])], blobs)
        conv = nn.Conv2d(cin, cout, (kh, kw), (sh, sw), (ph, pw), (dh, dw), group, bias)
        if blobs is not None:
            with torch.no_grad():
                conv.weight.copy_(self.take(layer, blobs[0], 0, (cout, cin // group, kh, kw)))
                if bias:
                    assert conv.bias is not None
                    conv.bias.copy_(self.take(layer, blobs[1], 1, (cout,)))
        self.add(layer, conv)

    def pooling(self, layer: CaffeLayer) -> None:
        p = layer.param("pooling_param")
        methods = {0: "max", 1: "avg"}
        if p.pool not in methods:
            _fail(self.path, layer, "STOCHASTIC pooling is not supported")
        if p.global_pooling:
            self.add(layer, GlobalPool(methods[p.pool]))
            return
        kh, kw = _pair(layer, p, "kernel", None, self.path)
        ph, pw = _pair(layer, p, "pad", 0, self.path)
        sh, sw = _pair(layer, p, "stride", 1, self.path)
        if 2 * ph > kh or 2 * pw > kw:
            # Caffe allows pad < kernel; torch (and ONNX Runtime) only pad <= kernel / 2.
            _fail(self.path, layer, f"pad {(ph, pw)} larger than half the kernel {(kh, kw)}")
        # Caffe rounds the output size up (and drops a last window that starts in the
        # padding): exactly torch's ceil_mode. Caffe's average divides by the window clipped
        # to the padded input, which is count_include_pad=True with ceil_mode.
        pool: nn.Module
        if p.pool == 0:
            pool = nn.MaxPool2d((kh, kw), (sh, sw), (ph, pw), ceil_mode=True)
        else:
            pool = nn.AvgPool2d((kh, kw), (sh, sw), (ph, pw), ceil_mode=True)
        self.add(layer, pool)

    def inner_product(self, layer: CaffeLayer) -> None:
        p = layer.param("inner_product_param")
        n, bias, axis, transpose = (
            int(p.num_output),
            bool(p.bias_term),
            int(p.axis),
            bool(p.transpose),
        )
        if n < 1:
            _fail(self.path, layer, "num_output must be positive")
        blobs = self.blobs(layer, 1 + bias)
        shape = self.bottom_shape(layer)
        if axis < 0 and shape is not None:
            axis += len(shape)
        if axis < 1:
            _fail(self.path, layer, f"axis {p.axis} is not supported")
        k = self.inner_size(layer, shape, axis, blobs, n)
        weight_shape = (k, n) if transpose else (n, k)
        self.budget(layer, [(n, k), *([(n,)] if bias else [])], blobs, [weight_shape, (n,)])
        ip = InnerProduct(k, n, bias, axis)
        if blobs is not None:
            with torch.no_grad():
                if transpose:
                    ip.weight.copy_(self.take(layer, blobs[0], 0, (k, n)).T)
                else:
                    ip.weight.copy_(self.take(layer, blobs[0], 0, (n, k)))
                if bias:
                    ip.bias.copy_(self.take(layer, blobs[1], 1, (n,)))
        self.add(layer, ip, "transposed weight" if transpose else "")

    def relu(self, layer: CaffeLayer) -> None:
        slope = float(layer.param("relu_param").negative_slope)
        self.add(layer, nn.LeakyReLU(slope) if slope else nn.ReLU())

    def prelu(self, layer: CaffeLayer) -> None:
        shared = bool(layer.param("prelu_param").channel_shared)
        blobs = self.blobs(layer, 1)
        c = 1 if shared else self.channels(layer, blobs)
        self.budget(layer, [(c,)])
        m = nn.PReLU(c)
        if blobs is not None:
            with torch.no_grad():
                m.weight.copy_(self.take(layer, blobs[0], 0, (c,)))
        self.add(layer, m)

    def batch_norm(self, layer: CaffeLayer) -> None:
        p = layer.param("batch_norm_param")
        blobs = self.blobs(layer, 3)
        c = self.channels(layer, blobs)
        use_global = bool(p.use_global_stats) if p.HasField("use_global_stats") else False
        self.budget(layer, [(c,), (c,)])
        bn = BatchNorm(c, p.eps, 1.0 - p.moving_average_fraction, False, use_global)
        if blobs is not None:
            mean_sum = self.take_count(layer, blobs[0], 0, c)
            var_sum = self.take_count(layer, blobs[1], 1, c)
            factor = float(self.take_count(layer, blobs[2], 2, 1)[0])
            # Caffe keeps sums and a normalizer; a zero normalizer means all-zero statistics.
            scale = 0.0 if factor == 0.0 else 1.0 / factor
            bn.running_mean.copy_(mean_sum * scale)
            bn.running_var.copy_(var_sum * scale)
        self.add(layer, bn, "mean=b0/b2, var=b1/b2")

    def scale(self, layer: CaffeLayer) -> None:
        p = layer.param("scale_param")
        if len(layer.bottoms) > 1:
            _fail(self.path, layer, "a Scale with its scale as a second bottom is not supported")
        blobs = self.blobs(layer, 1 + bool(p.bias_term))
        shape = self.bottom_shape(layer)
        axis, num_axes = int(p.axis), int(p.num_axes)
        if axis < 0:
            if shape is None:
                _fail(self.path, layer, "negative axis needs input_shape")
            axis += len(shape)
        if shape is not None:
            end = len(shape) if num_axes == -1 else axis + num_axes
            sshape = tuple(shape[axis:end])
        elif blobs is not None:
            sshape = tuple(blobs[0].data.shape)
        else:
            _fail(self.path, layer, "cannot tell the scale shape: give input_shape")
        self.budget(layer, [sshape] * (1 + bool(p.bias_term)))
        m = ChannelScale(sshape, bool(p.bias_term), axis)
        if blobs is not None:
            with torch.no_grad():
                m.weight.copy_(self.take(layer, blobs[0], 0, sshape))
                if m.bias is not None:
                    m.bias.copy_(self.take(layer, blobs[1], 1, sshape))
        self.add(layer, m)

    def bn_fork(self, layer: CaffeLayer) -> None:
        p = layer.param("bn_param")
        blobs = self.blobs(layer, 4)
        c = self.channels(layer, blobs)
        self.budget(layer, [(c,)] * 4)
        m = InvStdBatchNorm(c, p.eps, p.momentum, p.frozen)
        if blobs is not None:
            with torch.no_grad():
                m.weight.copy_(self.take_count(layer, blobs[0], 0, c))
                m.bias.copy_(self.take_count(layer, blobs[1], 1, c))
                m.running_mean.copy_(self.take_count(layer, blobs[2], 2, c))
                m.running_inv_std.copy_(self.take_count(layer, blobs[3], 3, c))
        self.add(layer, m, "blob 3 is 1/std: (x-b2)*b3*b0+b1")

    def dropout(self, layer: CaffeLayer) -> None:
        ratio = float(layer.param("dropout_param").dropout_ratio)
        if not 0.0 <= ratio < 1.0:  # NaN fails too
            _fail(self.path, layer, f"dropout_ratio must be in [0, 1), got {ratio}")
        self.add(layer, nn.Dropout(ratio))

    def flatten(self, layer: CaffeLayer) -> None:
        p = layer.param("flatten_param")
        self.add(layer, nn.Flatten(int(p.axis), int(p.end_axis)))

    def softmax(self, layer: CaffeLayer) -> None:
        self.add(layer, nn.Softmax(dim=int(layer.param("softmax_param").axis)))

    def eltwise(self, layer: CaffeLayer) -> None:
        p = layer.param("eltwise_param")
        n = len(layer.bottoms)
        if n < 2:
            _fail(self.path, layer, "needs at least 2 bottoms")
        coeffs = tuple(float(c) for c in p.coeff)
        if coeffs and (len(coeffs) != n or p.operation != 1):
            _fail(self.path, layer, f"{len(coeffs)} coeffs for {n} bottoms (SUM only)")
        op = {0: "prod", 1: "sum", 2: "max"}[p.operation]
        self.add(layer, Eltwise(op, coeffs or None), n_inputs=n)

    def concat(self, layer: CaffeLayer) -> None:
        p = layer.param("concat_param")
        # concat_dim is the deprecated spelling of axis.
        legacy = p.HasField("concat_dim") and not p.HasField("axis")
        axis = int(p.concat_dim) if legacy else int(p.axis)
        if len(layer.bottoms) < 1:
            _fail(self.path, layer, "needs bottoms")
        self.add(layer, Concat(axis), n_inputs=len(layer.bottoms))

    def simple(self, module: Callable[[], nn.Module]) -> Callable[[CaffeLayer], None]:
        return lambda layer: self.add(layer, module())

    def split(self, layer: CaffeLayer) -> None:
        self.check_bottoms(layer, 1)
        for top in layer.tops:
            self.builder.alias(top, layer.bottoms[0])
            self.shapes[top] = self.bottom_shape(layer)
        self.builder.mapping.append(MappingRow(layer.name, layer.type, "(alias)", "", "identity"))

    def _train_copy(self, layer: CaffeLayer) -> CaffeLayer:
        """The TRAIN-phase layer sharing this one's weight (the L-Softmax nets' TEST copy of
        ``ip2`` is a margin-1 layer sharing the TRAIN copy's weight), else the layer itself."""
        keys = {layer.name, *(n for n in layer.param_names if n)}
        for other in self.proto.layers:
            if other.type != layer.type or other is layer:
                continue
            if other.name in keys or any(n in keys for n in other.param_names if n):
                if _included(other, PHASES["train"]):
                    return other
        return layer

    def large_margin(self, layer: CaffeLayer) -> None:
        from lsoftmax.torch import LSoftmaxLinear

        self._margin_head(layer, "largemargin_inner_product_param", LSoftmaxLinear)

    def margin_inner_product(self, layer: CaffeLayer) -> None:
        """SphereFace's A-Softmax layer: L-Softmax's psi on normalized weights (the layer
        normalizes its weight blob in place on every forward), the same lambda schedule."""
        from lsoftmax.margins import SphereFace
        from lsoftmax.torch import MarginLinear

        self._margin_head(
            layer,
            "margin_inner_product_param",
            lambda k, n, m, sch: MarginLinear(k, n, margin=SphereFace(m), schedule=sch),
        )

    def _margin_head(
        self,
        layer: CaffeLayer,
        param_name: str,
        make_head: Callable[[int, int, int, Any], nn.Module],
    ) -> None:
        """LargeMarginInnerProduct and MarginInnerProduct: one weight blob (num_output, K), no
        bias, type SINGLE..QUADRUPLE = margin 1..4, Caffe's Exponential lambda schedule."""
        from lsoftmax.schedules import Exponential

        self.check_bottoms(layer, 1)
        p = layer.param(param_name)
        n, axis = int(p.num_output), int(p.axis)
        if n < 1:
            _fail(self.path, layer, "num_output must be positive")
        train = self._train_copy(layer) if self.phase == PHASES["test"] else layer
        tp = train.param(param_name)
        margin = int(tp.type) + 1
        try:
            schedule = Exponential(
                float(tp.base),
                float(tp.gamma),
                float(tp.power),
                float(tp.lambda_min),
                int(tp.iteration),
            )
        except (ValueError, TypeError) as e:
            _fail(self.path, train, f"bad lambda schedule: {e}")
        blobs = self.blobs(layer, 1)
        shape = self.bottom_shape(layer)
        k = self.inner_size(layer, shape, axis, blobs, n)
        self.budget(layer, [(n, k)], blobs)
        try:
            head = make_head(k, n, margin, schedule)
        except (ValueError, TypeError) as e:
            _fail(self.path, train, str(e))
        if blobs is not None:
            with torch.no_grad():
                head.weight.copy_(self.take(layer, blobs[0], 0, (n, k)))
        label = (
            layer.bottoms[1]
            if len(layer.bottoms) > 1 and self.builder.has(layer.bottoms[1])
            else None
        )
        src = "" if train is layer else " (from the TRAIN copy)"
        self.add(
            layer,
            head,
            f"eval: plain logits; train: margin {margin}{src}",
            kind="lsoftmax",
            label=label,
            flatten_from=axis,
        )
        if shape is not None:
            self.shapes[layer.tops[0]] = (shape[0], n)

    def class_distance(self, layer: CaffeLayer) -> None:
        try:
            from lsoftmax.torch.lgm import LGMLoss
        except ImportError as e:
            _fail(self.path, layer, f"needs lsoftmax.torch.lgm.LGMLoss ({e})")
        self.check_bottoms(layer, 1)
        p = layer.param("class_distance_param")
        if p.metric != 0:
            _fail(self.path, layer, "only metric L2 is supported")
        if p.bias_term:
            _fail(self.path, layer, "bias_term is not supported")
        n, iso = int(p.num_output), bool(p.isotropic)
        if n < 1:
            _fail(self.path, layer, "num_output must be positive")
        blobs = self.blobs(layer, 2)
        shape = self.bottom_shape(layer)
        if shape is not None:
            k = math.prod(shape[1:])
        elif blobs is not None:
            k = int(blobs[0].data.size) // n
        else:
            _fail(self.path, layer, "cannot tell the input size: give input_shape")
        self.budget(layer, [(n, k), (n, 1) if iso else (n, k)])
        mm = p.margin_mul
        alpha = float(mm.value)
        schedule = None
        note = f"alpha={alpha:g}"
        if p.HasField("margin_mul") and mm.policy != 0:
            from lsoftmax.schedules import StepUp

            policy = mm.DESCRIPTOR.fields_by_name["policy"].enum_type.values_by_number
            if mm.policy == 1:
                try:
                    schedule = StepUp(alpha, float(mm.gamma), int(mm.step), float(mm.max))
                except (ValueError, TypeError) as e:
                    _fail(self.path, layer, f"bad margin_mul schedule: {e}")
                note = f"alpha: {schedule}"
                if mm.iter:
                    note += f" (source starts at iter {mm.iter}: set the module's step)"
            else:
                note += f" (source policy {policy[mm.policy].name} not supported: held constant)"
        # The diagonal floor of Caffe's sigma is below LGMLoss's default log-variance floor.
        floor = math.log(ISO_SIGMA_OFFSET if iso else DIAG_SIGMA_FLOOR)
        try:
            head = LGMLoss(
                n,
                k,
                alpha=alpha,
                lambda_lkd=float(p.center_coef),
                isotropic=iso,
                learn_variance=bool(p.update_sigma),
                include_logdet=False,
                alpha_schedule=schedule,
                log_var_floor=floor,
            )
        except (ValueError, TypeError) as e:
            _fail(self.path, layer, f"cannot build LGMLoss: {e}")
        if blobs is not None:
            means = self.take(layer, blobs[0], 0, (n, k)).double()
            if iso:
                sigma = self.take(layer, blobs[1], 1, (n,)).double()
                var = sigma.clamp_min(0.0).add(ISO_SIGMA_OFFSET).reshape(n, 1)
            else:
                sigma = self.take(layer, blobs[1], 1, (n, k)).double()
                var = sigma.clamp_min(DIAG_SIGMA_FLOOR)
            with torch.no_grad():
                head.means.copy_(means)
                head.log_var.copy_(var.log().reshape(head.log_var.shape))
        label = (
            layer.bottoms[1]
            if len(layer.bottoms) > 1 and self.builder.has(layer.bottoms[1])
            else None
        )
        self.add(
            layer, head, note + "; no log-det (Caffe)", kind="lgm", label=label, flatten_from=1
        )
        if shape is not None:
            self.shapes[layer.tops[0]] = (shape[0], n)

    def transform(self, layer: CaffeLayer) -> None:
        """A data layer's ``transform_param`` as the first step of the net (TEST phase: centre
        crop, no mirror), so the converted net takes the data as the layer reads it."""
        p = layer.param("transform_param")
        has_mean_file = bool(p.mean_file)
        if not (p.mean_value or has_mean_file or p.scale != 1.0 or p.crop_size):
            return
        if has_mean_file and p.mean_value:
            _fail(self.path, layer, "transform_param sets both mean_file and mean_value")
        if not layer.tops:
            _fail(self.path, layer, "has no top")
        top = layer.tops[0]
        shape = self.shapes.get(top)
        mean: torch.Tensor | None = None
        if has_mean_file:
            mean = self._mean_image(layer, p.mean_file)
        elif p.mean_value:
            mean = torch.tensor(list(p.mean_value), dtype=torch.float32)
            channels = shape[1] if shape is not None and len(shape) > 1 else None
            if len(mean) > 1 and channels is not None and len(mean) != channels:
                _fail(
                    self.path,
                    layer,
                    f"transform_param has {len(mean)} mean_value entries for {channels} channels",
                )
        crop = int(p.crop_size)
        module = CaffeTransform(mean, float(p.scale), crop)
        self.builder.add(layer.name, module, [top], top)
        if shape is not None and crop:
            if len(shape) != 4 or shape[2] < crop or shape[3] < crop:
                _fail(self.path, layer, f"crop_size {crop} does not fit input shape {list(shape)}")
            shape = (*shape[:2], crop, crop)
        self.shapes[top] = shape
        notes = ["TEST phase: centre crop" if crop else ""]
        notes.append("mirror not applied" if p.mirror else "")
        self.builder.mapping.append(
            MappingRow(
                layer.name,
                "transform_param",
                type(module).__name__,
                param_shapes(module),
                "; ".join(n for n in notes if n),
            )
        )

    def _mean_image(self, layer: CaffeLayer, mean_file: str) -> torch.Tensor:
        # Caffe opens mean_file relative to its working directory; the prototxt's own directory
        # is the other place a copied model keeps it.
        candidates = [mean_file, os.path.join(os.path.dirname(self.path), mean_file)]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is None:
            _fail(
                self.path,
                layer,
                f"transform_param mean_file {mean_file!r} not found (looked in the working "
                "directory and beside the prototxt); copy it there, or convert with "
                "transform=False and subtract the mean yourself",
            )
        blob = parse_blob(found)
        shape = blob.data.shape
        if not (len(shape) == 3 or (len(shape) == 4 and shape[0] == 1)):
            _fail(self.path, layer, f"{found}: mean image has shape {list(shape)}, not (1,C,)H,W")
        data = blob.data.reshape(shape[-3:])
        return torch.from_numpy(np.ascontiguousarray(data, np.float32))

    def handlers(self) -> dict[str, Callable[[CaffeLayer], None]]:
        return {
            "Convolution": self.convolution,
            "Pooling": self.pooling,
            "InnerProduct": self.inner_product,
            "ReLU": self.relu,
            "PReLU": self.prelu,
            "Sigmoid": self.simple(nn.Sigmoid),
            "TanH": self.simple(nn.Tanh),
            "BatchNorm": self.batch_norm,
            "Scale": self.scale,
            "BN": self.bn_fork,
            "Dropout": self.dropout,
            "Flatten": self.flatten,
            "Split": self.split,
            "Eltwise": self.eltwise,
            "Concat": self.concat,
            "Softmax": self.softmax,
            "LargeMarginInnerProduct": self.large_margin,
            "MarginInnerProduct": self.margin_inner_product,
            "ClassDistance": self.class_distance,
        }


SUPPORTED_TYPES = (
    "Convolution",
    "Pooling",
    "InnerProduct",
    "ReLU",
    "PReLU",
    "Sigmoid",
    "TanH",
    "BatchNorm",
    "Scale",
    "BN",
    "Dropout",
    "Flatten",
    "Split",
    "Eltwise",
    "Concat",
    "Softmax",
    "LargeMarginInnerProduct",
    "MarginInnerProduct",
    "ClassDistance",
    *DATA_TYPES,
    *DROPPED_TYPES,
)


def unsupported_layer(layer: CaffeLayer, path: str) -> None:
    """Raise the unknown-layer error if ``layer``'s type cannot be converted."""
    if layer.type not in SUPPORTED_TYPES:
        raise ValueError(
            f"{path}: layer {layer.name!r} has unsupported type {layer.type!r} "
            f"(supported: {', '.join(sorted(set(SUPPORTED_TYPES)))})"
        )


def _inputs(
    conv: _Converter, layers: list[CaffeLayer], input_shape: tuple[int, ...] | None
) -> tuple[str, str | None]:
    """Declare the net inputs; returns (data blob, label blob or None)."""
    names: list[tuple[str, tuple[int, ...] | None]] = list(conv.proto.inputs)
    for layer in layers:
        if layer.type == "Input":
            shapes = [tuple(int(d) for d in s.dim) for s in layer.param("input_param").shape]
            for i, top in enumerate(layer.tops):
                shape = shapes[i] if i < len(shapes) else (shapes[0] if len(shapes) == 1 else None)
                names.append((top, shape))
        elif layer.type in DATA_TYPES:
            names.extend((top, None) for top in layer.tops)
    if not names:
        raise ValueError(f"{conv.path}: no input (no `input`, Input or data layer)")
    seen: dict[str, tuple[int, ...] | None] = {}
    for name, shape in names:
        seen.setdefault(name, shape)
    ordered = list(seen)
    if len(ordered) > 2:
        raise ValueError(
            f"{conv.path}: {len(ordered)} inputs {ordered}; converted nets take (data, label)"
        )
    data = ordered[0]
    label = ordered[1] if len(ordered) > 1 else None
    for name in ordered:
        conv.builder.define_input(name)
    conv.shapes[data] = tuple(input_shape) if input_shape is not None else seen[data]
    shape = conv.shapes[data]
    if shape is not None:
        if len(shape) < 2 or any(d < 1 for d in shape):
            raise ValueError(
                f"{conv.path}: input {data!r} has shape {list(shape)}; expected "
                "positive dimensions (N, C, ...)"
            )
        check_elements(
            f"{conv.path}: input {data!r}", "one sample", (1, *shape[1:]), MAX_ACTIVATION_ELEMENTS
        )
    if label is not None:
        conv.shapes[label] = None
    return data, label


def from_caffe(
    prototxt: str | os.PathLike[str],
    caffemodel: str | os.PathLike[str] | None = None,
    phase: str = "test",
    input_shape: tuple[int, ...] | None = None,
    *,
    transform: bool = True,
) -> ConvertedNet:
    """Convert a Caffe net (prototxt + optional caffemodel) to a torch module, in eval mode.

    ``phase`` ("test" or "train") selects layers by their include/exclude rules, as Caffe
    does. ``input_shape`` (N, C, H, W) of the data blob enables shape checks and is needed
    without a caffemodel when the prototxt does not declare it. Without a caffemodel the
    weights are freshly initialized. ``transform``: a data layer's ``transform_param``
    (``mean_value`` or ``mean_file``, ``scale``, ``crop_size``) becomes the net's first step,
    as Caffe's TEST phase applies it, so the net takes raw data; False leaves it out (for data
    that is already transformed).
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be 'train' or 'test', got {phase!r}")
    if input_shape is not None and (
        not all(isinstance(d, int) and d > 0 for d in input_shape) or len(input_shape) < 2
    ):
        raise ValueError(f"input_shape must be positive ints (N, C, ...), got {input_shape!r}")
    proto = read_prototxt(prototxt)
    weights = read_caffemodel(caffemodel) if caffemodel is not None else None
    conv = _Converter(proto, weights, PHASES[phase])
    layers = [layer for layer in proto.layers if _included(layer, conv.phase)]
    for layer in layers:
        unsupported_layer(layer, proto.path)
    data, label = _inputs(conv, layers, input_shape)
    handlers = conv.handlers()
    for layer in layers:
        if layer.type in DATA_TYPES:
            conv.builder.mapping.append(
                MappingRow(layer.name, layer.type, "(input)", "", ", ".join(layer.tops))
            )
            if transform and layer.type in TRANSFORMED_TYPES:
                conv.transform(layer)
            continue
        if layer.type in DROPPED_TYPES:
            conv.builder.mapping.append(
                MappingRow(layer.name, layer.type, "(dropped)", "", "training/eval only")
            )
            continue
        if layer.type != "Input":
            conv.check_bottoms(layer, 1)
        try:
            handlers[layer.type](layer)
        except (ValueError, RuntimeError, TypeError, OverflowError) as e:
            # Our own errors already name the file; anything else (torch's) gets the layer.
            known = (proto.path, weights.path if weights else proto.path)
            if isinstance(e, ValueError) and str(e).startswith(known):
                raise
            _fail(proto.path, layer, f"{type(e).__name__}: {e}")
    for layer in layers:
        src = conv.by_name.get(layer.name)
        if src is not None and layer.name not in conv.used:
            # Caffe's CopyTrainedLayersFrom refuses this too ("Incompatible number of blobs").
            raise ValueError(
                f"{conv.weights.path if conv.weights else ''}: layer {layer.name!r} has "
                f"{len(src.blobs)} blobs, but a {layer.type} in {proto.path} takes none"
            )
    source = {
        "format": "caffe",
        "prototxt": os.fspath(prototxt),
        "caffemodel": os.fspath(caffemodel) if caffemodel is not None else None,
        "phase": phase,
        "net_name": proto.name,
        "input_shape": conv.shapes.get(data),
    }
    return conv.builder.build(data, label, source).eval()
