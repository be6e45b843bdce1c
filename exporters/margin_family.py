"""ONNX export of the margin family: ``lsoftmax::margin_family_linear`` ->
``ai.lsoftmax::MarginLinear``.

``MarginLinear(X[N,D], W[C,D], labels[N]?) -> Y[N,C]`` with attributes ``kind`` (string,
required: ``lsoftmax``, ``sphereface``, ``cosface``, ``arcface``, ``combined``), the float
parameters ``margin`` (default 0), ``m1`` (1), ``m2`` (0), ``m3`` (0), ``scale`` (1), ``lambda``
(0), the int ``easy_margin`` (0), and for each float parameter ``P`` an optional ``P_lo``
(default 0): ONNX attributes are float32, so a float64 value is written as its float32 part
``P`` and the float32 rounding of the rest ``P_lo``, and the op uses ``P + P_lo`` (as
``LGMLogits``' ``alpha_lo``). The math of each kind is in docs/margins.md; the kernel is
``ort_ops/margin_linear_op.cc``; ``build_margin_linear`` is the standard-op form (portable
export and model-local function body).

``ai.lsoftmax::LSoftmaxLinear`` stays as it is: files written before this op existed run
unchanged, and ``LSoftmaxLinear`` modules keep exporting to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from lsoftmax.exporters.domain import DOMAIN, DOMAIN_VERSION, opset
from lsoftmax.exporters.lgm import split_alpha
from onnx import numpy_helper
from onnx.defs import OpSchema

if TYPE_CHECKING:
    from lsoftmax.exporters.portable import NodeBuilder

__all__ = [
    "MARGIN_LINEAR",
    "MARGIN_LINEAR_DEFAULTS",
    "MARGIN_LINEAR_INPUTS",
    "MARGIN_LINEAR_SPECIALIZED",
    "build_margin_linear",
    "margin_attributes",
    "margin_family_linear",
    "margin_from_attributes",
    "margin_linear_schema",
    "plain_variant",
]

MARGIN_LINEAR = "MarginLinear"
MARGIN_LINEAR_INPUTS = ["X", "W", "labels"]
# The float parameters, in the order of the torch op's params ([margin, m1, m2, m3, scale,
# easy_margin]) and the core's MarginSpec.
FLOAT_PARAMS = ("margin", "m1", "m2", "m3", "scale")
# Defaults shared by the kernel (ort_ops/margin_linear_op.h) and the function body.
MARGIN_LINEAR_DEFAULTS: dict[str, float | int] = {
    "margin": 0.0,
    "m1": 1.0,
    "m2": 0.0,
    "m3": 0.0,
    "scale": 1.0,
    "easy_margin": 0,
    "lambda": 0.0,
    **{f"{p}_lo": 0.0 for p in (*FLOAT_PARAMS, "lambda")},
}
# The attributes a function body is specialized on (baked in as float64 constants): everything
# but lambda, which stays an attribute reference as in LSoftmaxLinear's function.
MARGIN_LINEAR_SPECIALIZED = (
    "kind",
    *FLOAT_PARAMS,
    *(f"{p}_lo" for p in FLOAT_PARAMS),
    "easy_margin",
)
# The parameters each kind reads (the exporter writes only these; the others keep defaults).
KIND_PARAMS: dict[str, tuple[str, ...]] = {
    "lsoftmax": ("margin", "lambda"),
    "sphereface": ("margin", "lambda"),
    "cosface": ("margin", "scale"),
    "arcface": ("margin", "scale", "easy_margin"),
    "combined": ("m1", "m2", "m3", "scale"),
}
PSI_KINDS = ("lsoftmax", "sphereface")

# Norms below sqrt(FLT_MIN) make a row degenerate (no margin), as the core's float path; see
# portable._DEGENERATE_NORM.
_DEGENERATE_NORM = float(np.sqrt(np.finfo(np.float32).tiny))
_DOUBLE = onnx.TensorProto.DOUBLE


def margin_linear_schema() -> OpSchema:
    param = OpSchema.FormalParameter
    h = onnx.helper

    def attr(name: str, doc: str) -> OpSchema.Attribute:
        return OpSchema.Attribute(name, h.make_attribute(name, MARGIN_LINEAR_DEFAULTS[name]), doc)

    lo = [
        attr(f"{p}_lo", f"low part of {p}: the op uses {p} + {p}_lo (float64 values)")
        for p in (*FLOAT_PARAMS, "lambda")
    ]
    return OpSchema(
        MARGIN_LINEAR,
        DOMAIN,
        DOMAIN_VERSION,
        doc=(
            "Margin-family linear layer (L-Softmax, SphereFace, CosFace, ArcFace, combined): plain "
            "logits x W^T (lsoftmax), |x| cos theta_j (sphereface) or s cos theta_j (the cosine "
            "kinds); "
            "with labels each row's target logit gets the kind's margin (docs/margins.md)."
        ),
        inputs=[
            param("X", "T", "features (N, D)"),
            param("W", "T", "class weights (C, D)"),
            param(
                "labels",
                "L",
                "target class per row (N); absent: plain logits",
                param_option=OpSchema.FormalParameterOption.Optional,
            ),
        ],
        outputs=[param("Y", "T", "logits (N, C)")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(double)"], "float types"),
            ("L", ["tensor(int64)", "tensor(int32)"], "label types"),
        ],
        attributes=[
            OpSchema.Attribute(
                "kind",
                OpSchema.AttrType.STRING,
                "lsoftmax, sphereface, cosface, arcface or combined",
                required=True,
            ),
            attr("margin", "m: an integer >= 1 (lsoftmax, sphereface), radians (arcface)"),
            attr("m1", "multiplicative angular margin m1 > 0 (combined)"),
            attr("m2", "additive angular margin, radians (combined)"),
            attr("m3", "additive cosine margin (combined)"),
            attr("scale", "s > 0, the cosine kinds' scale"),
            attr("easy_margin", "arcface: 1 keeps s c where c <= 0"),
            attr("lambda", "blending weight lambda >= 0 (lsoftmax, sphereface)"),
            *lo,
        ],
    )


def margin_attributes(kind: str, params: Sequence[float], lam: float) -> dict[str, Any]:
    """The node attributes of ``(kind, params, lam)`` (the torch op's arguments; params =
    ``[margin, m1, m2, m3, scale, easy_margin]``), validated by the core's rule: only those the
    kind reads, each float split into its float32 part and ``_lo`` remainder."""
    from lsoftmax import _core

    values = [float(v) for v in params]
    _core.validate_margin_spec(kind, values, float(lam))
    full: dict[str, float] = dict(zip(FLOAT_PARAMS, values[:5], strict=True))
    full["lambda"] = float(lam)
    attrs: dict[str, Any] = {"kind": kind}
    for name in KIND_PARAMS[kind]:
        if name == "easy_margin":
            if values[5]:
                attrs["easy_margin"] = 1
            continue
        hi, lo = split_alpha(full[name])
        attrs[name] = hi
        if lo != 0.0:
            attrs[f"{name}_lo"] = lo
    return attrs


def margin_family_linear(
    x: Any,
    weight: Any,
    labels: Any = None,
    lam: float = 0.0,
    kind: str = "lsoftmax",
    params: Sequence[float] = (4.0, 0.0, 0.0, 0.0, 0.0, 0.0),
) -> Any:
    """``torch.ops.lsoftmax.margin_family_linear`` -> ``ai.lsoftmax::MarginLinear``."""
    attrs = margin_attributes(kind, params, lam)
    if labels is None:
        return opset.MarginLinear(x, weight, **attrs)
    return opset.MarginLinear(x, weight, labels, **attrs)


def margin_from_attributes(attrs: Mapping[str, object]) -> tuple[Any, float]:
    """``(lsoftmax.margins spec, lambda)`` of a node's attributes (``P + P_lo``), the inverse of
    ``margin_attributes`` (the numpy kernels of tests and tools run nodes with it)."""
    from lsoftmax import margins

    kind = _kind(attrs)
    m = _full(attrs, "margin")
    fields: dict[str, dict[str, object]] = {
        "lsoftmax": {"m": int(m)},
        "sphereface": {"m": int(m)},
        "cosface": {"m": m, "s": _full(attrs, "scale")},
        "arcface": {
            "m": m,
            "s": _full(attrs, "scale"),
            "easy_margin": bool(attrs.get("easy_margin", 0)),
        },
        "combined": {
            "m1": _full(attrs, "m1"),
            "m2": _full(attrs, "m2"),
            "m3": _full(attrs, "m3"),
            "s": _full(attrs, "scale"),
        },
    }
    if kind not in fields:
        margins.kind_class(kind)  # the core's unknown-kind message
    return margins.margin_from_dict({"kind": kind, **fields[kind]}), _full(attrs, "lambda")


def _full(attrs: Mapping[str, object], name: str) -> float:
    """A float parameter's value, ``P + P_lo``, from constant attributes."""
    hi = attrs.get(name, MARGIN_LINEAR_DEFAULTS[name])
    lo = attrs.get(f"{name}_lo", 0.0)
    return float(hi) + float(lo)  # type: ignore[arg-type]


def _kind(attrs: Mapping[str, object]) -> str:
    kind = attrs.get("kind")
    if isinstance(kind, bytes):
        kind = kind.decode()
    if not isinstance(kind, str):
        raise ValueError(f"{DOMAIN}::{MARGIN_LINEAR} needs a string attribute 'kind'")
    return kind


def plain_variant(attrs: Mapping[str, object]) -> dict[str, object]:
    """The specialized attributes that stand for ``attrs`` in a node without labels: the plain
    logits depend only on what the kind normalizes and on its scale, so all such nodes of one
    group share one function body."""
    kind = _kind(attrs)
    if kind in PSI_KINDS:
        return {"kind": kind, "margin": 1.0}
    return {
        "kind": "cosface",
        "margin": 0.0,
        "scale": attrs.get("scale", 1.0),
        "scale_lo": attrs.get("scale_lo", 0.0),
    }


def build_margin_linear(
    b: NodeBuilder,
    inputs: Sequence[str | None],
    output: str,
    attrs: Mapping[str, object],
) -> None:
    """``MarginLinear(X[N,D], W[C,D], labels[N]?) -> Y[N,C]`` in standard ops.

    ``attrs``: the node's attributes as constants, except ``lambda`` / ``lambda_lo``, which may
    be ``AttrRef``s (a function body). The kinds' math is the core's (margin_family.h), with the
    psi of ``portable.psi_float64`` and every margin computation in float64.
    """
    from lsoftmax.exporters.portable import AttrRef, build_lsoftmax_linear, psi_float64

    from lsoftmax import _core

    x, w = inputs[0], inputs[1]
    labels = inputs[2] if len(inputs) > 2 and inputs[2] else None
    assert x is not None and w is not None
    kind = _kind(attrs)
    values = [_full(attrs, p) for p in FLOAT_PARAMS]
    easy = int(attrs.get("easy_margin", 0))  # type: ignore[call-overload]
    lam_hi = attrs.get("lambda", 0.0)
    lam_lo = attrs.get("lambda_lo", 0.0)
    const_lam = (
        0.0
        if isinstance(lam_hi, AttrRef) or isinstance(lam_lo, AttrRef)
        else (
            float(lam_hi) + float(lam_lo)  # type: ignore[arg-type]
        )
    )
    # The core's one rule (names the attribute); a referenced lambda is checked by the runtime.
    _core.validate_margin_spec(kind, [*values, float(easy)], const_lam)

    def lam_tensor(like: str) -> str:
        hi = b.scalar(lam_hi, like)  # type: ignore[arg-type]
        if isinstance(lam_lo, AttrRef) or float(lam_lo) != 0.0:  # type: ignore[arg-type]
            return b.op("Add", hi, b.scalar(lam_lo, like))  # type: ignore[arg-type]
        return hi

    if kind == "lsoftmax":
        build_lsoftmax_linear(
            b, inputs, output, {"margin": int(values[0]), "lambda": 0.0}, lam_tensor=lam_tensor
        )
        return
    axes = b.int64([1])
    tiny = b.like(_DEGENERATE_NORM, x)
    norm_w = b.op("Sqrt", b.op("ReduceSumSquare", w, axes, keepdims=1))  # [C, 1]
    w_hat = b.op("Div", w, b.op("Max", norm_w, tiny))
    if kind == "sphereface":
        margin = int(values[0])
        plain = labels is None or margin == 1
        logits = b.op("Gemm", x, w_hat, output=output if plain else None, transB=1)
        if plain:
            return
        assert labels is not None
        idx = b.op("Unsqueeze", labels, b.int64([1]))
        f = b.op("GatherElements", logits, idx, axis=1)  # |x| cos theta_t  [N, 1]
        norm_x = b.op("Sqrt", b.op("ReduceSumSquare", x, axes, keepdims=1))
        norm_wt = b.op("Gather", norm_w, labels, axis=0)  # [N, 1]
        degenerate = b.op("Or", b.op("Less", norm_x, tiny), b.op("Less", norm_wt, tiny))
        one = b.like(1.0, x)
        cos = b.op(
            "Clip", b.op("Div", f, b.op("Where", degenerate, one, norm_x)), b.like(-1.0, x), one
        )
        psi = b.op("CastLike", psi_float64(b, b.op("Cast", cos, to=_DOUBLE), margin), x)
        lam_t = lam_tensor(x)
        # |x| (c + (psi - c) / (1 + lambda)), the core's form.
        g = b.op(
            "Mul",
            norm_x,
            b.op("Add", cos, b.op("Div", b.op("Sub", psi, cos), b.op("Add", one, lam_t))),
        )
        g = b.op("Where", degenerate, f, g)
        b.op("ScatterElements", logits, idx, g, output=output, axis=1)
        return
    # The cosine kinds: s Xn Wn^T, and s phi(c) on the target.
    scale = values[4]
    norm_x = b.op("Sqrt", b.op("ReduceSumSquare", x, axes, keepdims=1))  # [N, 1]
    x_hat = b.op("Div", x, b.op("Max", norm_x, tiny))
    cosines = b.op("Gemm", x_hat, w_hat, transB=1)
    s = b.like(scale, x)
    if labels is None:
        b.op("Mul", cosines, s, output=output)
        return
    logits = b.op("Mul", cosines, s)
    idx = b.op("Unsqueeze", labels, b.int64([1]))
    f = b.op("GatherElements", logits, idx, axis=1)  # the plain target logit s c
    c_raw = b.op("GatherElements", cosines, idx, axis=1)
    norm_wt = b.op("Gather", norm_w, labels, axis=0)
    degenerate = b.op("Or", b.op("Less", norm_x, tiny), b.op("Less", norm_wt, tiny))
    c = b.op("Clip", b.op("Cast", c_raw, to=_DOUBLE), _const(b, -1.0), _const(b, 1.0))
    phi = _cosine_phi(b, kind, c, values, bool(easy))
    g = b.op("CastLike", b.op("Mul", phi, _const(b, scale)), x)
    g = b.op("Where", degenerate, f, g)
    b.op("ScatterElements", logits, idx, g, output=output, axis=1)


def _const(b: NodeBuilder, v: float) -> str:
    return b.op("Constant", value=numpy_helper.from_array(np.asarray(v, dtype=np.float64)))


def _cosine_phi(b: NodeBuilder, kind: str, c: str, values: Sequence[float], easy: bool) -> str:
    """phi(c) of a cosine kind for a float64 tensor of clamped cosines, in float64
    (``values``: the float parameters in FLOAT_PARAMS order)."""
    m = values[0]
    if kind == "cosface":
        return b.op("Sub", c, _const(b, m))
    one = _const(b, 1.0)
    sin_t = b.op("Sqrt", b.op("Mul", b.op("Sub", one, c), b.op("Add", one, c)))  # sin theta
    if kind == "combined":
        m1, m2, m3 = values[1], values[2], values[3]
        angle = b.op("Add", b.op("Mul", _theta_float64(b, c, sin_t), _const(b, m1)), _const(b, m2))
        return b.op("Sub", b.op("Cos", angle), _const(b, m3))
    assert kind == "arcface", kind
    # cos(theta + m) = c cos m - sin(theta) sin m, sin(theta) = sqrt((1 - c)(1 + c)) >= 0: no
    # Acos (onnxruntime has none for float64).
    shifted = b.op(
        "Sub",
        b.op("Mul", c, _const(b, math.cos(m))),
        b.op("Mul", sin_t, _const(b, math.sin(m))),
    )
    if easy:
        return b.op("Where", b.op("Greater", c, _const(b, 0.0)), shifted, c)
    fallback = b.op("Sub", c, _const(b, m * math.sin(m)))
    return b.op("Where", b.op("Less", c, _const(b, math.cos(math.pi - m))), fallback, shifted)


def _theta_float64(b: NodeBuilder, c: str, sin_t: str) -> str:
    """theta = acos(c) in float64 for a float64 tensor c (sin_t = sin theta): onnxruntime has
    Acos in float32 only, so theta_0 = acos(float32(c)) is refined twice by
    theta_1 = theta_0 + sin(theta - theta_0) = theta_0 + sin_t cos theta_0 - c sin theta_0 (the
    step's asin dropped: its cube, ~(3e-4)^3 / 6 on the first step next to c = +-1, then ~1e-23).
    Needs float64 Cos and Sin (onnxruntime 1.16 lacks them; 1.32 has them)."""
    theta = b.op("Cast", b.op("Acos", b.op("Cast", c, to=onnx.TensorProto.FLOAT)), to=_DOUBLE)
    for _ in range(2):
        step = b.op(
            "Sub",
            b.op("Mul", sin_t, b.op("Cos", theta)),
            b.op("Mul", c, b.op("Sin", theta)),
        )
        theta = b.op("Add", theta, step)
    return theta
