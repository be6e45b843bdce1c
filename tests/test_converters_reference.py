"""Independent float64 numpy forwards of Caffe and MXNet nets, used by the converter tests.

They read the source files' own tensors (raw protobuf messages, raw params arrays) and follow
the source frameworks' loops (Caffe's pooling_layer.cpp output sizes and windows, im2col
convolution), never the converter's code or torch. The tests at the bottom check the
reference itself on cases small enough to reason about by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

# ---- ops ----------------------------------------------------------------------------------


def conv2d(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None,
    stride: tuple[int, int] = (1, 1),
    pad: tuple[int, int] = (0, 0),
    dil: tuple[int, int] = (1, 1),
    group: int = 1,
) -> np.ndarray:
    """im2col convolution (cross-correlation, as in Caffe/MXNet), float64."""
    x = x.astype(np.float64)
    w = w.astype(np.float64)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    assert c == cg * group, (c, cg, group)
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    ho = (h + 2 * pad[0] - (dil[0] * (kh - 1) + 1)) // stride[0] + 1
    wo = (wd + 2 * pad[1] - (dil[1] * (kw - 1) + 1)) // stride[1] + 1
    cols = np.empty((n, c, kh, kw, ho, wo))
    for i in range(kh):
        for j in range(kw):
            hs, ws = i * dil[0], j * dil[1]
            cols[:, :, i, j] = xp[
                :,
                :,
                hs : hs + stride[0] * (ho - 1) + 1 : stride[0],
                ws : ws + stride[1] * (wo - 1) + 1 : stride[1],
            ]
    out = np.zeros((n, o, ho, wo))
    og = o // group
    for g in range(group):
        col = cols[:, g * cg : (g + 1) * cg].reshape(n, cg * kh * kw, ho * wo)
        wg = w[g * og : (g + 1) * og].reshape(og, -1)
        out[:, g * og : (g + 1) * og] = np.einsum("ok,nkp->nop", wg, col).reshape(n, og, ho, wo)
    if b is not None:
        out += b.astype(np.float64).reshape(1, -1, 1, 1)
    return out


def pool2d(
    x: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pad: tuple[int, int],
    mode: str,
    rounding: str = "caffe",
    include_pad: bool = True,
) -> np.ndarray:
    """Max/average pooling with explicit loops.

    ``rounding``: "caffe" (ceil, then drop a last window starting in the padding, only when
    padded: pooling_layer.cpp), "floor" (MXNet valid), "full" (MXNet full: plain ceil).
    Average divisor: the window clipped to the padded input (``include_pad``), or to the input.
    """
    x = x.astype(np.float64)
    n, c, h, w = x.shape
    size = []
    for dim, k, s, p in ((h, kernel[0], stride[0], pad[0]), (w, kernel[1], stride[1], pad[1])):
        if rounding == "floor":
            o = (dim + 2 * p - k) // s + 1
        else:
            o = math.ceil((dim + 2 * p - k) / s) + 1
            if rounding == "caffe" and p > 0 and (o - 1) * s >= dim + p:
                o -= 1
        size.append(o)
    out = np.empty((n, c, size[0], size[1]))
    for oh in range(size[0]):
        for ow in range(size[1]):
            hs, ws = oh * stride[0] - pad[0], ow * stride[1] - pad[1]
            he, we = min(hs + kernel[0], h + pad[0]), min(ws + kernel[1], w + pad[1])
            pool_size = (he - hs) * (we - ws)
            hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
            win = x[:, :, hs:he, ws:we]
            if mode == "max":
                out[:, :, oh, ow] = win.max(axis=(2, 3))
            else:
                div = pool_size if include_pad else (he - hs) * (we - ws)
                out[:, :, oh, ow] = win.sum(axis=(2, 3)) / div
    return out


def softmax(z: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def chan(v: np.ndarray, ndim: int) -> np.ndarray:
    """Per-channel vector shaped to broadcast over axis 1 of an ndim array."""
    return v.astype(np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def max_rel(a: Any, ref: Any) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))


# ---- Caffe interpreter over a NetParameter message --------------------------------------

_V1 = {4: "Convolution", 17: "Pooling", 14: "InnerProduct", 18: "ReLU", 20: "Softmax",
       21: "SoftmaxWithLoss", 1: "Accuracy", 5: "Data", 6: "Dropout", 8: "Flatten",
       22: "Split", 19: "Sigmoid", 23: "TanH"}  # fmt: skip


def _blobs(layer: Any) -> list[np.ndarray]:
    out = []
    for b in layer.blobs:
        shape = (
            tuple(b.shape.dim) if b.HasField("shape") else (b.num, b.channels, b.height, b.width)
        )
        data = np.asarray(b.double_data if len(b.double_data) else b.data, np.float64)
        out.append(data.reshape(shape))
    return out


def _hw(p: Any, name: str, default: int) -> tuple[int, int]:
    if p.HasField(f"{name}_h"):
        return getattr(p, f"{name}_h"), getattr(p, f"{name}_w")
    key = "kernel_size" if name == "kernel" else name
    v = getattr(p, key)
    if isinstance(v, int):
        return (v, v) if p.HasField(key) or name == "kernel" else (default, default)
    v = list(v)
    return (default, default) if not v else (v[0], v[-1])


def caffe_transform(x: np.ndarray, p: Any, mean_image: np.ndarray | None = None) -> np.ndarray:
    """Caffe's DataTransformer::Transform at TEST phase, element by element as it loops:
    top[c, h, w] = (datum[c, h_off + h, w_off + w] - mean) * scale."""
    n, c, height, width = x.shape
    crop = p.crop_size
    h_off, w_off = ((height - crop) // 2, (width - crop) // 2) if crop else (0, 0)
    oh, ow = (crop, crop) if crop else (height, width)
    means = list(p.mean_value)
    out = np.empty((n, c, oh, ow))
    for i in range(n):
        for ch in range(c):
            for h in range(oh):
                for w in range(ow):
                    v = x[i, ch, h_off + h, w_off + w]
                    if mean_image is not None:
                        v = v - mean_image[ch, h_off + h, w_off + w]
                    elif means:
                        v = v - (means[0] if len(means) == 1 else means[ch])
                    out[i, ch, h, w] = v * p.scale
    return out


def caffe_forward(
    net: Any,
    inputs: dict[str, np.ndarray],
    phase: str = "test",
    margin_iter: int | None = None,
) -> dict[str, np.ndarray]:
    """Run a NetParameter (prototxt or caffemodel message with blobs) in numpy; returns blobs.

    Loss/accuracy layers are skipped; L-Softmax heads give the test-time plain logits (also
    for ``phase="train"``, which only selects layers, e.g. of a caffemodel: a TRAIN snapshot);
    L-GM heads give Caffe's ClassDistance logits (no log-determinant). SphereFace heads
    (MarginInnerProduct) give ``x . w_j / |w_j|``, and with ``margin_iter`` (the layer's
    ``iter_`` after its increment) the A-Softmax logits for the label blob, by
    ``margin_inner_product``.
    """
    blobs = {k: v.astype(np.float64) for k, v in inputs.items()}
    layers = list(net.layer) if len(net.layer) else list(net.layers)
    want = 1 if phase == "test" else 0
    for layer in layers:
        ltype = layer.type if isinstance(layer.type, str) else _V1.get(layer.type, str(layer.type))
        if layer.include and not any(
            (not r.HasField("phase")) or r.phase == want for r in layer.include
        ):
            continue
        if ltype in ("Data", "ImageData", "MemoryData", "WindowData"):
            if layer.HasField("transform_param") and layer.top[0] in blobs:
                blobs[layer.top[0]] = caffe_transform(blobs[layer.top[0]], layer.transform_param)
            continue
        if ltype in ("HDF5Data", "Input", "SoftmaxWithLoss", "Accuracy"):
            continue
        w = _blobs(layer)
        x = blobs[layer.bottom[0]]
        if ltype == "Convolution":
            p = layer.convolution_param
            dil = list(p.dilation) or [1]
            y = conv2d(
                x, w[0], w[1].ravel() if p.bias_term else None, _hw(p, "stride", 1),
                _hw(p, "pad", 0), (dil[0], dil[-1]), p.group,
            )  # fmt: skip
        elif ltype == "Pooling":
            p = layer.pooling_param
            mode = "max" if p.pool == 0 else "avg"
            if p.global_pooling:
                y = (
                    x.max(axis=(2, 3), keepdims=True)
                    if mode == "max"
                    else x.mean(axis=(2, 3), keepdims=True)
                )
            else:
                y = pool2d(x, _hw(p, "kernel", 0), _hw(p, "stride", 1), _hw(p, "pad", 0), mode)
        elif ltype == "InnerProduct":
            p = layer.inner_product_param
            xf = x.reshape(*x.shape[: p.axis], -1)
            wm = (
                w[0].reshape(-1, xf.shape[-1])
                if not p.transpose
                else w[0].reshape(xf.shape[-1], -1).T
            )
            y = xf @ wm.T + (w[1].ravel() if p.bias_term else 0.0)
        elif ltype == "LargeMarginInnerProduct":
            y = x.reshape(x.shape[0], -1) @ w[0].reshape(-1, x[0].size).T
        elif ltype == "MarginInnerProduct":
            p = layer.margin_inner_product_param
            xf = x.reshape(x.shape[0], -1)
            wm = w[0].reshape(-1, xf.shape[1])
            if margin_iter is None:
                y = xf @ (wm / np.linalg.norm(wm, axis=1, keepdims=True)).T
            else:
                y = margin_inner_product(xf, wm, blobs[layer.bottom[1]], p, margin_iter)
        elif ltype == "ClassDistance":
            p = layer.class_distance_param
            f = x.reshape(x.shape[0], -1)
            mu = w[0].reshape(-1, f.shape[1])
            diff2 = (f[:, None, :] - mu[None]) ** 2
            if p.isotropic:
                y = -0.5 * diff2.sum(-1) / (np.maximum(w[1].ravel(), 0.0) + 1e-4)[None]
            else:
                y = -0.5 * (diff2 / np.maximum(w[1].reshape(mu.shape), 1e-8)[None]).sum(-1)
        elif ltype == "ReLU":
            s = layer.relu_param.negative_slope
            y = np.where(x > 0, x, s * x)
        elif ltype == "PReLU":
            a = w[0].ravel()
            y = np.where(x > 0, x, (a[0] if a.size == 1 else chan(a, x.ndim)) * x)
        elif ltype == "Sigmoid":
            y = 1.0 / (1.0 + np.exp(-x))
        elif ltype == "TanH":
            y = np.tanh(x)
        elif ltype == "BN":
            sc, sh, mean, inv_std = (chan(b.ravel(), x.ndim) for b in w)
            y = (x - mean) * inv_std * sc + sh
        elif ltype == "BatchNorm":
            f = w[2].ravel()[0]
            f = 0.0 if f == 0 else 1.0 / f
            mean, var = chan(w[0].ravel() * f, x.ndim), chan(w[1].ravel() * f, x.ndim)
            y = (x - mean) / np.sqrt(var + layer.batch_norm_param.eps)
        elif ltype == "Scale":
            y = x * chan(w[0].ravel(), x.ndim)
            if layer.scale_param.bias_term:
                y = y + chan(w[1].ravel(), x.ndim)
        elif ltype == "Eltwise":
            p = layer.eltwise_param
            xs = [blobs[b] for b in layer.bottom]
            if p.operation == 1:
                coeff = list(p.coeff) or [1.0] * len(xs)
                y = sum(c * v for c, v in zip(coeff, xs, strict=True))
            elif p.operation == 0:
                y = np.prod(np.stack(xs), axis=0)
            else:
                y = np.max(np.stack(xs), axis=0)
        elif ltype == "Concat":
            p = layer.concat_param
            axis = p.concat_dim if p.HasField("concat_dim") and not p.HasField("axis") else p.axis
            y = np.concatenate([blobs[b] for b in layer.bottom], axis=axis)
        elif ltype in ("Dropout", "Split"):
            y = x
        elif ltype == "Flatten":
            y = x.reshape(x.shape[0], -1)
        elif ltype == "Softmax":
            y = softmax(x, layer.softmax_param.axis)
        else:
            raise NotImplementedError(ltype)
        for top in layer.top:
            blobs[top] = y
    return blobs


def margin_inner_product(
    x: np.ndarray, w: np.ndarray, label: np.ndarray, p: Any, it: int
) -> np.ndarray:
    """SphereFace's MarginInnerProductLayer::Forward_cpu in float64, step by step: weight rows
    normalized, lambda = max(lambda_min, base (1 + gamma it)^-power), the target logit
    |x| (sign-selected Chebyshev polynomial) blended as (lambda x.w + that) / (1 + lambda), with
    the layer's sign_0..sign_4 formulas for DOUBLE..QUADRUPLE."""
    lam = max(p.lambda_min, p.base * (1.0 + p.gamma * it) ** (-p.power))
    w = w / np.sqrt((w * w).sum(axis=1, keepdims=True))
    x_norm = np.sqrt((x * x).sum(axis=1))
    plain = x @ w.T
    cos = plain / x_norm[:, None]
    sign0 = np.sign(cos)
    out = plain.copy()
    for i, lab in enumerate(label.astype(np.int64).ravel()):
        c, s0 = cos[i, lab], sign0[i, lab]
        if p.type == 0:  # SINGLE
            continue
        if p.type == 1:  # DOUBLE: |x| (2 sign_0 c^2 - 1)
            t = 2.0 * s0 * c**2 - 1.0
        elif p.type == 2:  # TRIPLE: |x| (sign_1 (4c^3 - 3c) + sign_2)
            s1 = np.sign(abs(c) - 0.5)
            s2 = s0 * (1.0 + s1) - 2.0
            t = s1 * (4.0 * c**3 - 3.0 * c) + s2
        else:  # QUADRUPLE: |x| (sign_3 (8c^4 - 8c^2 + 1) + sign_4)
            s3 = s0 * np.sign(2.0 * c**2 - 1.0)
            s4 = 2.0 * s0 + s3 - 3.0
            t = s3 * (8.0 * c**4 - 8.0 * c**2 + 1.0) + s4
        out[i, lab] = (x_norm[i] * t + lam * plain[i, lab]) / (1.0 + lam)
    return out


# ---- MXNet interpreter over a symbol JSON + params --------------------------------------


def _tup(s: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    if s is None:
        return default
    v = eval(s)  # attribute strings like "(2, 2)": test-only, on files the tests wrote or own
    return (v,) if isinstance(v, int) else tuple(v)


def mxnet_forward(
    symbol: dict[str, Any],
    params: dict[str, np.ndarray],
    data: np.ndarray,
    label: np.ndarray | None = None,
    lsoftmax_train: Callable[[np.ndarray, np.ndarray, np.ndarray, dict[str, str]], np.ndarray]
    | None = None,
) -> dict[str, np.ndarray]:
    """Run a symbol in numpy (inference semantics); returns every node's output by name."""
    nodes = symbol["nodes"]
    vals: dict[int, np.ndarray] = {}

    def arr(i: int) -> np.ndarray:
        name = nodes[i]["name"]
        for key in (f"arg:{name}", f"aux:{name}", name):
            if key in params:
                return params[key].astype(np.float64)
        raise KeyError(name)

    for i, nd in enumerate(nodes):
        op, a = nd["op"], nd.get("attrs", {})
        ins = [j for j, *_ in nd["inputs"]]
        if op == "null":
            if nd["name"] == "data":
                vals[i] = data.astype(np.float64)
            elif "label" in nd["name"]:
                vals[i] = label if label is not None else np.zeros(len(data))
            else:
                vals[i] = arr(i)
            continue
        x = vals[ins[0]]
        if op == "Convolution":
            nb = a.get("no_bias", "False") in ("True", "true", "1")
            y = conv2d(
                x, vals[ins[1]], None if nb else vals[ins[2]], _tup(a.get("stride"), (1, 1)),
                _tup(a.get("pad"), (0, 0)), _tup(a.get("dilate"), (1, 1)),
                int(a.get("num_group", 1)),
            )  # fmt: skip
        elif op == "Pooling":
            mode = a.get("pool_type", "max")
            if a.get("global_pool", "False") in ("True", "true", "1"):
                y = (
                    x.max(axis=(2, 3), keepdims=True)
                    if mode == "max"
                    else x.mean(axis=(2, 3), keepdims=True)
                )
            else:
                rounding = "full" if a.get("pooling_convention", "valid") == "full" else "floor"
                y = pool2d(
                    x, _tup(a["kernel"], ()), _tup(a.get("stride"), (1, 1)),
                    _tup(a.get("pad"), (0, 0)), mode, rounding,
                    a.get("count_include_pad", "True") in ("True", "true", "1"),
                )  # fmt: skip
        elif op == "FullyConnected":
            flat = a.get("flatten", "True") in ("True", "true", "1")
            xf = x.reshape(x.shape[0], -1) if flat else x
            y = xf @ vals[ins[1]].T
            if a.get("no_bias", "False") not in ("True", "true", "1"):
                y = y + vals[ins[2]]
        elif op == "Activation":
            t = a["act_type"]
            y = {"relu": lambda v: np.maximum(v, 0), "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
                 "tanh": np.tanh}[t](x)  # fmt: skip
        elif op == "LeakyReLU":
            t = a.get("act_type", "leaky")
            slope = float(a.get("slope", 0.25))
            if t == "prelu":
                y = np.where(x > 0, x, chan(vals[ins[1]], x.ndim) * x)
            else:
                y = np.where(x > 0, x, slope * x)
        elif op == "BatchNorm":
            fix = a.get("fix_gamma", "True") in ("True", "true", "1")
            gamma = np.ones_like(vals[ins[1]]) if fix else vals[ins[1]]
            eps = float(a.get("eps", 1e-3))
            mean, var = vals[ins[3]], vals[ins[4]]
            y = (x - chan(mean, x.ndim)) / np.sqrt(chan(var, x.ndim) + eps) * chan(
                gamma, x.ndim
            ) + chan(vals[ins[2]], x.ndim)
        elif op in ("elemwise_add", "_Plus"):
            y = x + vals[ins[1]]
        elif op == "Concat":
            y = np.concatenate([vals[j] for j in ins], axis=int(a.get("dim", 1)))
        elif op in ("Flatten", "flatten"):
            y = x.reshape(x.shape[0], -1)
        elif op == "Dropout":
            y = x
        elif op == "SoftmaxOutput":
            y = softmax(x, 1)
        elif op in ("Custom", "LSoftmax"):
            w = vals[ins[2]]
            y = x.reshape(x.shape[0], -1) @ w.T
            if lsoftmax_train is not None and label is not None:
                y = lsoftmax_train(x, w, label, a)
        else:
            raise NotImplementedError(op)
        vals[i] = y
    return {nodes[i]["name"]: v for i, v in vals.items()}


# ---- tests of the reference itself --------------------------------------------------------


def test_conv2d_matches_direct_sum() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 4, 5, 6))
    w = rng.normal(size=(6, 2, 3, 2))
    b = rng.normal(size=6)
    y = conv2d(x, w, b, stride=(2, 1), pad=(1, 0), dil=(1, 2), group=2)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    for o in range(6):
        g = o // 3
        for i in range(y.shape[2]):
            for j in range(y.shape[3]):
                acc = b[o]
                for c in range(2):
                    for u in range(3):
                        for v in range(2):
                            acc += w[o, c, u, v] * xp[0, g * 2 + c, 2 * i + u, j + 2 * v]
                assert y[0, o, i, j] == pytest.approx(acc, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(
    ("h", "k", "s", "p", "caffe_out"),
    [
        (28, 2, 2, 0, 14),
        (7, 2, 2, 0, 4),
        (6, 3, 2, 1, 4),
        (5, 3, 2, 1, 3),
        (32, 3, 2, 1, 17),
        (4, 2, 3, 1, 2),
    ],
)
def test_pool_sizes_follow_caffe(h: int, k: int, s: int, p: int, caffe_out: int) -> None:
    # Output sizes from Caffe's formula worked by hand: ceil((h + 2p - k) / s) + 1, minus one
    # when the last window would start inside the padding.
    y = pool2d(np.zeros((1, 1, h, h)), (k, k), (s, s), (p, p), "max")
    assert y.shape[2:] == (caffe_out, caffe_out)


def test_avg_pool_divisor_counts_padding_not_overhang() -> None:
    x = np.ones((1, 1, 3, 3))
    # k=2, s=2, p=0 on 3x3: ceil gives 2x2; the last window overhangs the input by one, and
    # Caffe divides by the window clipped to the (unpadded here) input: every output is 1.
    y = pool2d(x, (2, 2), (2, 2), (0, 0), "avg")
    assert np.allclose(y, 1.0)
    # With p=1 the corner window covers one real pixel of a 2x2 window inside the padding.
    y = pool2d(x, (2, 2), (2, 2), (1, 1), "avg")
    assert y[0, 0, 0, 0] == pytest.approx(0.25)
